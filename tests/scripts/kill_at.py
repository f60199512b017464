"""A callback that SIGKILLs its own process at a given step (``kill -9`` in mid-training)."""

import os
import signal

import lightning as L


class KillAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillOnceAt(KillAt):
    """Kills the first process of all that share ``marker`` to reach ``step``; the marker file
    records which Tune trial it was, so that the retried run passes."""

    def __init__(self, step: int, marker: str) -> None:
        super().__init__(step)
        self.marker = marker

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        try:
            handle = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        import ray.tune

        os.write(handle, ray.tune.get_context().get_trial_id().encode())
        os.close(handle)
        os.kill(os.getpid(), signal.SIGKILL)
