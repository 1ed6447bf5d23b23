"""Per-layer recurrent memories used by :mod:`diagpass.models.family`.

Every memory module offers the same interface in two styles:

* functional: ``read(x, state) -> (x', prefix)`` and ``write(x, y, state) -> new_state``,
  where ``state`` is ``None`` before the first segment;
* research-code style, state kept in module attributes: ``reset_state()``,
  ``read_attr(x) -> (x', prefix)``, ``write_attr(x, y)``, ``detach_state()``.
  A Python flag ``self.first_segment`` marks segment 0.

Both styles run exactly the same tensor operations in the same order, so their
results are bitwise identical.

``x`` is the cell input (hidden states from layer l-1 of the same segment),
``y`` the output of the wrapped decoder layer, ``prefix`` extra keys/values for
the attention (only the Transformer-XL cache uses it).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-5


def dpfp(x: torch.Tensor, nu: int) -> torch.Tensor:
    """DPFP feature map: u = [relu(x), relu(-x)]; phi = concat_j u * roll(u, j), j = 1..nu."""
    u = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
    return torch.cat([u * torch.roll(u, shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)


def elu_feature(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def memory_positions(y: torch.Tensor, num_mem_tokens: int) -> torch.Tensor:
    """The memory-token outputs ``y[:, -M:]``, or all of ``y`` when M == 0."""
    if num_mem_tokens > 0:
        return y[:, -num_mem_tokens:]
    return y


class _Memory(nn.Module):
    """Base class. ``_state_names`` lists the attributes that hold state."""

    _state_names: tuple[str, ...] = ()

    def __init__(self, num_mem_tokens: int):
        super().__init__()
        self.num_mem_tokens = num_mem_tokens
        self.reset_state()

    def reset_state(self) -> None:
        for name in self._state_names:
            setattr(self, name, None)
        self.first_segment = True

    def detach_state(self) -> None:
        for name in self._state_names:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.detach())


class AssociativeMemory(_Memory):
    """ARMT associative memory (see shared/ARMT.md). State (A, z): (B, d_key, d), (B, d_key)."""

    _state_names = ("A", "z")

    def __init__(self, d_model: int, d_mem: int, nu: int, num_mem_tokens: int):
        super().__init__(num_mem_tokens)
        self.nu = nu
        self.W_q = nn.Linear(d_model, d_mem, bias=False)
        self.W_k = nn.Linear(d_model, d_mem, bias=False)
        self.W_v = nn.Linear(d_model, d_model, bias=False)  # randomly initialised (not zero)
        self.W_b = nn.Linear(d_model, 1, bias=True)

    def _read(self, x, A, z):
        q = dpfp(self.W_q(x), self.nu)
        return x + (q @ A) / (q @ z.unsqueeze(-1) + EPS)

    def _kvb(self, y):
        m = memory_positions(y, self.num_mem_tokens)
        k = dpfp(self.W_k(m), self.nu)
        v = self.W_v(m)
        beta = torch.sigmoid(self.W_b(m))
        return k, v, beta

    def _first_write(self, y):
        # s = 0: Vbar = 0, gamma = 1, A and z start at zero.
        k, v, beta = self._kvb(y)
        return k.transpose(1, 2) @ (beta * v), k.sum(1)

    def _delta(self, y, A, z):
        k, v, beta = self._kvb(y)
        kz = k @ z.unsqueeze(-1) + EPS
        v_bar = (k @ A) / kz
        gamma = torch.clamp(1.0 - kz / (k.pow(2).sum(-1, keepdim=True) + EPS), 0.0, 1.0).detach()
        return k.transpose(1, 2) @ (beta * (v - v_bar)), (gamma * k).sum(1)

    # functional
    def read(self, x, state):
        if state is None:
            return x, None
        A, z = state
        return self._read(x, A, z), None

    def write(self, x, y, state):
        if state is None:
            return self._first_write(y)
        A, z = state
        dA, dz = self._delta(y, A, z)
        return A + dA, z + dz

    # research style
    def read_attr(self, x):
        if self.first_segment:
            return x, None
        return self._read(x, self.A, self.z), None

    def write_attr(self, x, y):
        if self.first_segment:
            self.A, self.z = self._first_write(y)
            self.first_segment = False
        else:
            dA, dz = self._delta(y, self.A, self.z)
            self.A = self.A + dA
            self.z = self.z + dz


class LinearAttentionMemory(_Memory):
    """Linear-attention state with elu+1 features: S (B, d, d), z (B, d); ARMT without corrections."""

    _state_names = ("S", "z")

    def __init__(self, d_model: int, num_mem_tokens: int):
        super().__init__(num_mem_tokens)
        self.W_q = nn.Linear(d_model, d_model, bias=False)
        self.W_k = nn.Linear(d_model, d_model, bias=False)
        self.W_v = nn.Linear(d_model, d_model, bias=False)

    def _read(self, x, S, z):
        q = elu_feature(self.W_q(x))
        return x + (q @ S) / (q @ z.unsqueeze(-1) + EPS)

    def _delta(self, y):
        m = memory_positions(y, self.num_mem_tokens)
        k = elu_feature(self.W_k(m))
        v = self.W_v(m)
        return k.transpose(1, 2) @ v, k.sum(1)

    def read(self, x, state):
        if state is None:
            return x, None
        S, z = state
        return self._read(x, S, z), None

    def write(self, x, y, state):
        dS, dz = self._delta(y)
        if state is None:
            return dS, dz
        S, z = state
        return S + dS, z + dz

    def read_attr(self, x):
        if self.first_segment:
            return x, None
        return self._read(x, self.S, self.z), None

    def write_attr(self, x, y):
        dS, dz = self._delta(y)
        if self.first_segment:
            self.S, self.z = dS, dz
            self.first_segment = False
        else:
            self.S = self.S + dS
            self.z = self.z + dz


class GatedMemory(_Memory):
    """Gated memory vector m (B, d): read x + W_r m; write m <- a m + (1-a) tanh(W_w mean(Y_mem))."""

    _state_names = ("m",)

    def __init__(self, d_model: int, num_mem_tokens: int):
        super().__init__(num_mem_tokens)
        self.W_r = nn.Linear(d_model, d_model, bias=False)
        self.W_w = nn.Linear(d_model, d_model, bias=True)
        self.g = nn.Parameter(torch.zeros(d_model))

    def _read(self, x, m):
        return x + self.W_r(m).unsqueeze(1)

    def _candidate(self, y):
        return torch.tanh(self.W_w(memory_positions(y, self.num_mem_tokens).mean(1)))

    def read(self, x, state):
        if state is None:
            return x, None  # m = 0 before segment 0: nothing to read
        return self._read(x, state), None

    def write(self, x, y, state):
        c = self._candidate(y)
        a = torch.sigmoid(self.g)
        if state is None:
            return (1.0 - a) * c
        return a * state + (1.0 - a) * c

    def read_attr(self, x):
        if self.first_segment:
            return x, None
        return self._read(x, self.m), None

    def write_attr(self, x, y):
        c = self._candidate(y)
        a = torch.sigmoid(self.g)
        if self.first_segment:
            self.m = (1.0 - a) * c
            self.first_segment = False
        else:
            self.m = a * self.m + (1.0 - a) * c


class XLCacheMemory(_Memory):
    """Transformer-XL cache: the state is this layer's input of the previous segment.

    It is handed to the attention as ``prefix`` (extra keys/values, attended by every query).
    No parameters.
    """

    _state_names = ("cache",)

    def __init__(self, num_mem_tokens: int, detach: bool):
        super().__init__(num_mem_tokens)
        self.detach = detach

    def _store(self, x):
        return x.detach() if self.detach else x

    def read(self, x, state):
        return x, state

    def write(self, x, y, state):
        return self._store(x)

    def read_attr(self, x):
        if self.first_segment:
            return x, None
        return x, self.cache

    def write_attr(self, x, y):
        self.cache = self._store(x)
        self.first_segment = False


class SkipMemory(_Memory):
    """Memory from layer l of segment s to layer l+k of segment s+1.

    Read (every segment): x + W_r(src), src = the incoming vector (B, d) or, when there is
    none (segment 0, or l < k), the learned ``init``. Write: c = tanh(W_w mean(Y_mem)),
    only on layers that have a consumer (l + k < L); other layers have no W_w.

    Research style: ``incoming`` (read this segment) and ``outgoing`` (written this segment);
    the model moves ``outgoing`` of layer l into ``incoming`` of layer l+k after each segment.
    """

    _state_names = ("incoming", "outgoing")

    def __init__(self, d_model: int, num_mem_tokens: int, has_consumer: bool):
        super().__init__(num_mem_tokens)
        self.has_consumer = has_consumer
        self.W_r = nn.Linear(d_model, d_model, bias=False)
        self.init = nn.Parameter(torch.zeros(d_model))
        self.W_w = nn.Linear(d_model, d_model, bias=True) if has_consumer else None

    def _read(self, x, incoming):
        src = self.init.expand(x.shape[0], -1) if incoming is None else incoming
        return x + self.W_r(src).unsqueeze(1)

    def _write(self, y):
        if self.W_w is None:
            return None
        return torch.tanh(self.W_w(memory_positions(y, self.num_mem_tokens).mean(1)))

    def read(self, x, state):
        return self._read(x, state), None

    def write(self, x, y, state):
        return self._write(y)

    def read_attr(self, x):
        return self._read(x, self.incoming), None

    def write_attr(self, x, y):
        self.outgoing = self._write(y)
        self.first_segment = False


def make_memory(config, layer_idx: int) -> _Memory | None:
    """The per-layer memory module of ``config.memory_kind``, or None for "rmt" / "none"."""
    kind = config.memory_kind
    M = config.num_mem_tokens
    d = config.d_model
    if kind == "associative":
        return AssociativeMemory(d, config.d_mem, config.nu, M)
    if kind == "linear_attention":
        return LinearAttentionMemory(d, M)
    if kind == "gated":
        return GatedMemory(d, M)
    if kind == "xl_cache":
        return XLCacheMemory(0, config.xl_detach)
    if kind == "skip_k":
        return SkipMemory(d, M, layer_idx + config.memory_shift < config.n_layers)
    return None
