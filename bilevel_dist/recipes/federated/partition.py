"""Client partitions of a labelled training set: IID, Dirichlet(α) over labels, and McMahan's
pathological label shards. Deterministic by seed; every client ends with at least one sample.

Past :data:`WITH_REPLACEMENT_ABOVE` clients a dataset like digits (1,437 training samples) cannot
give every client its own samples: each client then draws ``samples_per_client`` samples *with
replacement* from the same scheme's distribution (IID: uniform; Dirichlet: its own label mix;
shards: its two labels), so clients share samples.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bilevel_dist._checks import ConfigError

SCHEMES = ("iid", "dirichlet", "shards")
WITH_REPLACEMENT_ABOVE = 1000


def partition(
    labels: Tensor,
    clients: int,
    scheme: str = "iid",
    alpha: float = 0.3,
    shards_per_client: int = 2,
    samples_per_client: int = 8,
    seed: int = 0,
) -> list[Tensor]:
    """Each client's sample indices into ``labels`` (sorted)."""
    if scheme not in SCHEMES:
        raise ConfigError("partition", f"unknown partition {scheme!r}; choose one of {list(SCHEMES)}")
    if not isinstance(clients, int) or isinstance(clients, bool) or clients < 1:
        raise ConfigError("clients", f"clients must be a positive integer, got {clients!r}")
    if scheme == "dirichlet" and not alpha > 0:
        raise ConfigError("alpha", f"alpha must be > 0 (the Dirichlet concentration), got {alpha!r}")
    n = len(labels)
    generator = torch.Generator().manual_seed(seed)
    if clients > WITH_REPLACEMENT_ABOVE:
        return _with_replacement(labels, clients, scheme, alpha, shards_per_client, samples_per_client, generator)
    if scheme == "iid":
        if clients > n:
            raise ConfigError("clients", f"{clients} clients but only {n} samples")
        parts = torch.randperm(n, generator=generator).tensor_split(clients)
    elif scheme == "dirichlet":
        parts = _dirichlet(labels, clients, alpha, generator)
    else:
        shards = clients * shards_per_client
        if shards > n:
            raise ConfigError(
                "shards_per_client", f"{clients} clients × {shards_per_client} shards = {shards} shards > {n} samples"
            )
        order = torch.sort(labels, stable=True).indices  # label-sorted, then cut into equal shards
        pieces = order.tensor_split(shards)
        owner = torch.randperm(shards, generator=generator).view(clients, shards_per_client)
        parts = [torch.cat([pieces[int(s)] for s in row]) for row in owner]
    return [part.sort().values for part in parts]


def _dirichlet(labels: Tensor, clients: int, alpha: float, generator: torch.Generator) -> list[Tensor]:
    """Each class's samples split over clients in Dirichlet(α) proportions; a client left empty
    takes one sample from the largest client, so that every client holds data."""
    classes = int(labels.max()) + 1
    concentration = torch.full((clients,), float(alpha), dtype=torch.float64)
    owners = torch.empty(len(labels), dtype=torch.long)
    for c in range(classes):  # a loop over the classes (10), not over clients or samples
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        shares = _sample_dirichlet(concentration, generator)
        cuts = (shares.cumsum(0) * len(members)).round().long().clamp(max=len(members))
        counts = torch.diff(cuts, prepend=cuts.new_zeros(1))
        owners[members] = torch.repeat_interleave(torch.arange(clients), counts)
    sizes = torch.bincount(owners, minlength=clients)
    for empty in (sizes == 0).nonzero().flatten().tolist():
        donor = int(sizes.argmax())
        moved = (owners == donor).nonzero().flatten()[0]
        owners[moved] = empty
        sizes[donor] -= 1
        sizes[empty] += 1
    order = torch.sort(owners, stable=True).indices
    return list(order.split(sizes.tolist()))


def _sample_dirichlet(concentration: Tensor, generator: torch.Generator) -> Tensor:
    """Dirichlet draws, one per row of ``concentration``, from ``generator`` (which
    ``torch.distributions`` does not take): normalised Gamma(α, 1) draws by Marsaglia–Tsang
    rejection, boosted for α < 1 (``Gamma(α) = Gamma(α + 1) · U^{1/α}``)."""
    boosted = concentration + 1.0
    d = boosted - 1.0 / 3.0
    c = 1.0 / (9.0 * d).sqrt()
    draws = torch.empty_like(concentration)
    pending = torch.ones_like(concentration, dtype=torch.bool)
    while pending.any():  # rejection sampling, vectorised over the clients
        z = torch.randn(concentration.shape, generator=generator, dtype=concentration.dtype)
        u = torch.rand(concentration.shape, generator=generator, dtype=concentration.dtype)
        v = (1 + c * z) ** 3
        accept = (
            pending & (v > 0) & (u.clamp_min(1e-300).log() < 0.5 * z**2 + d - d * v + d * v.clamp_min(1e-300).log())
        )
        draws = torch.where(accept, d * v, draws)
        pending &= ~accept
    u = torch.rand(concentration.shape, generator=generator, dtype=concentration.dtype)
    gamma = draws * u.clamp_min(1e-300) ** (1.0 / concentration)
    gamma = gamma.clamp_min(1e-300)
    return gamma / gamma.sum(-1, keepdim=True)


def _with_replacement(
    labels: Tensor,
    clients: int,
    scheme: str,
    alpha: float,
    shards_per_client: int,
    samples_per_client: int,
    generator: torch.Generator,
) -> list[Tensor]:
    classes = int(labels.max()) + 1
    by_class = [(labels == c).nonzero().flatten() for c in range(classes)]
    if scheme == "iid":
        mix = torch.full((clients, classes), 1.0 / classes, dtype=torch.float64)
    elif scheme == "dirichlet":
        mix = _sample_dirichlet(torch.full((clients, classes), float(alpha), dtype=torch.float64), generator)
    else:
        chosen = torch.rand(clients, classes, generator=generator, dtype=torch.float64).argsort(1)[
            :, :shards_per_client
        ]
        mix = torch.zeros(clients, classes, dtype=torch.float64).scatter_(1, chosen, 1.0 / shards_per_client)
    # each sample: a class from the client's mix, then a member of that class, uniformly
    drawn = torch.multinomial(mix, samples_per_client, replacement=True, generator=generator)
    sizes = torch.tensor([len(m) for m in by_class])
    offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    pick = (torch.rand(drawn.shape, generator=generator, dtype=torch.float64) * sizes[drawn]).long()
    flat = torch.cat(by_class)
    return [row for row in flat[offsets[drawn] + pick]]
