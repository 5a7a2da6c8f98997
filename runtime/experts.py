"""An experts implementation that pays only for the (token, expert) pairs that run.

transformers 5.x experts modules take ``(hidden_states [T, H], top_k_index [T, K],
top_k_weights [T, K])`` and dispatch on ``config._experts_implementation``
through ``ExpertsInterface``. Slots whose index is ``num_experts`` mean "no
expert". The stock ``grouped_mm`` path still gathers, activates, weights and
scatters all T*K rows; this one drops the sentinel slots first, groups the
surviving pairs by expert and multiplies only those rows.

Two ways to multiply the grouped rows, chosen per call:

* many experts have rows (prefill, batched decode): one ``grouped_mm`` per projection;
* few have (batch-1 decode with many experts, on CPU): a loop over only the
  experts that have rows. On CPU, ``grouped_mm`` visits every expert, and an
  empty group still costs a matmul call: with 64 experts and 3 active ones that
  fixed cost is about as large as the useful work, and it does not shrink with k.

One token on CPU (batch-1 decode) skips the grouping and the scatter as well
(``_one_token_experts``): the same loop, the same sums, without their small ops.

Up to 16 tokens on CPU with float32 SwiGLU experts (decoding) go instead through one call of
a C kernel (``_native_few_experts``, runtime/native/experts_few.c): the same pairs summed in
the same order, the dot products in another, so the same outputs up to float rounding.

Registered under the name ``allocplan_ragged``; ``apply_plan`` selects it with
``model.set_experts_implementation`` and restores the previous choice on remove.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers.activations import SiLUActivation
from transformers.integrations.moe import ExpertsInterface, _default_apply_gate

from .native import standins_kernel
from .fast_paths import fast_paths
from .routing_rules import as_dtype

IMPLEMENTATION_NAME = "allocplan_ragged"
# Attribute apply_plan sets on an experts module whose dropped candidates are compensated (StandIns).
COMPENSATION_ATTR = "_allocplan_compensation"


@dataclass(frozen=True)
class StandIns:
    """Cheap stand-ins for the outputs of experts a token's candidates dropped.

    Expert e's stand-in for input x is ``bias[e] + (x @ down[e]) @ up[e]``: a constant
    (its mean output on calibration tokens, MoNE) plus, for ``linear`` compensation, a
    rank-r linear map fitted by least squares. A one-row ``bias`` serves every expert
    (``layer`` compensation).

    Attributes:
        bias: [E, H] or [1, H].
        down: [E, H, r] or None.
        up: [E, r, H] or None.
        order: [E] drop order, or None: the routing ranks a token's candidates by selection
            score times ``order[e]``, a power of how far expert e's stand-in misses its output,
            so the candidates that are dropped are those whose stand-ins serve best.
        one_copy: hold the factors once, in the native kernel's half-precision tables, where that
            kernel serves them (``down`` and ``up`` are then half views of those tables); the torch
            forms widen them to float32 on each call. Exact either way: the kernel serves only
            factors that lie on the half grid. apply_plan sets it (``FastPaths.one_copy_stand_ins``);
            the planner's stand-ins keep their float32 factors, which it measures through.
    """

    bias: torch.Tensor
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    order: torch.Tensor | None = None
    one_copy: bool = field(default=False, compare=False)

    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # Each expert's (bias [H], down [H, r'], up [r', H]) as views of the padded factors, built once with
    # them: indexing a tensor per slot costs an op each time (about 2.5 us on CPU).
    _views: list = field(default_factory=list, init=False, repr=False, compare=False)
    # down and up behind one row of zeros (row 0), with r padded by zeros to whole 16-byte rows, which
    # grouped_mm needs. ``down`` and ``up`` become views of rows 1.. and the first r columns, so their
    # values (and every product with them) are unchanged; batch-1 decode maps a kept slot to row 0.
    _padded: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)
    # The native kernel's tables (``_native_tables``), or None where it cannot serve these stand-ins.
    _native: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.down is None:
            return
        rank, per_row = self.down.shape[-1], max(1, 16 // self.down.element_size())
        padded_rank = -(-rank // per_row) * per_row
        experts, hidden = self.down.shape[0], self.down.shape[1]
        down = self.down.new_zeros(experts + 1, hidden, padded_rank)  # [1 + E, H, r']
        down[1:, :, :rank] = self.down
        up = self.up.new_zeros(experts + 1, padded_rank, self.up.shape[-1])  # [1 + E, r', H]
        up[1:, :rank] = self.up
        object.__setattr__(self, "_padded", (down, up))
        object.__setattr__(self, "down", down[1:, :, :rank])
        object.__setattr__(self, "up", up[1:, :rank])
        object.__setattr__(self, "_native", self._native_tables())
        if self.one_copy and self._native is not None:
            # The float32 factors go; the torch forms widen the half tables when they run (_padded_factors).
            object.__setattr__(self, "_padded", None)
            object.__setattr__(self, "down", self._native[1])
            object.__setattr__(self, "up", self._native[2])
            return
        # Built here rather than on the first decode step, which would otherwise pay for them (about
        # 0.13 ms per layer of 64 experts on CPU).
        self._views.extend(self._views_of(down, up))

    def _views_of(self, down: torch.Tensor, up: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Each expert's (bias [H], down [H, r'], up [r', H]) as views of padded factors [1 + E, H, r'] and
        [1 + E, r', H]."""
        return [(self.bias[e if self.bias.shape[0] > 1 else 0], down[1 + e], up[1 + e])
                for e in range(down.shape[0] - 1)]

    def _padded_factors(self, zero_row: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded factors (``_padded``'s layout and dtype), or without their zero row 0 for
        ``zero_row=False``: held, or, for one copy, widened from the half tables for this call (exact, as they
        lie on the half grid). Widening costs a pass over the tables; it serves only calls the native kernel
        declines."""
        if self._padded is not None:
            return self._padded if zero_row else (self._padded[0][1:], self._padded[1][1:])
        down, up = self.down, self.up  # [E, H, r] and [E, r, H] half
        experts, hidden, rank = down.shape
        padded_rank = -(-rank // 4) * 4  # 16-byte float32 rows, as __post_init__ pads them
        if not zero_row and padded_rank == rank:  # nothing to pad: one pass each
            return down.float(), up.float()
        first = 1 if zero_row else 0
        wide_down = torch.zeros(experts + first, hidden, padded_rank, dtype=torch.float32)  # [(1 +) E, H, r']
        wide_down[first:, :, :rank] = down
        wide_up = torch.zeros(experts + first, padded_rank, up.shape[-1], dtype=torch.float32)  # [(1 +) E, r', H]
        wide_up[first:, :rank] = up
        return wide_down, wide_up

    def one_token_table(self, num_experts: int) -> torch.Tensor:
        """[2E, H] for a layer of E experts: zeros for indices below E (kept slots), then the constant
        stand-in of index E + e (row E doubles as the plain sentinel's, whose weight is 0). One gather
        over a token's K slot indices then gives its dropped slots' stand-ins and exact zeros for the
        rest, with no select. Built once."""
        if num_experts not in self._tables:
            constants = self.bias.expand(num_experts, -1)  # [E, H]
            self._tables[num_experts] = torch.cat([torch.zeros_like(constants), constants])
        return self._tables[num_experts]

    def one_token_rows(self, hidden: torch.Tensor, slots: torch.Tensor, num_experts: int) -> torch.Tensor:
        """[K, H] stand-in outputs of one token's K slot indices (kept e, dropped E + e), exact zeros
        for kept slots.

        The constants (or biases) are one gather from :meth:`one_token_table`. Linear stand-ins
        add the map through the padded factors, where a kept slot maps to the zero row 0 and a
        dropped one (or the plain sentinel E, whose weight is 0) to row 1 + e, so no select is
        needed: a kept slot gives 0 + (x @ 0) @ 0 = 0.

        Args:
            hidden: [1, H] the token's input.
            slots: [K] its slot indices.
        """
        bias = self.one_token_table(num_experts).index_select(0, slots)  # [K, H], zeros for kept slots
        if self.down is None:
            return bias
        rows = (slots - (num_experts - 1)).clamp_min_(0)  # [K] 0 for kept slots, 1 + e for dropped ones
        down, up = self._padded_factors()  # [1 + E, H, r'] and [1 + E, r', H]
        count = slots.shape[0]
        inner = torch.bmm(as_dtype(hidden, down.dtype).expand(count, 1, -1), down.index_select(0, rows))  # [K, 1, r']
        return torch.baddbmm(bias.unsqueeze(1), inner, up.index_select(0, rows)).squeeze(1)  # [K, H]

    def add_dropped_one_token(self, result: torch.Tensor, hidden: torch.Tensor, slots: list[int],
                              weights: list[float], num_experts: int) -> torch.Tensor:
        """Add one token's dropped slots' weighted linear stand-ins to ``result`` [1, H], in place, one
        slot at a time through views of the padded factors (batch-1 decode on CPU).

        ``one_token_rows`` copies all K slots' [H, r'] and [r', H] factors to multiply them in one
        batch: at batch 1 that copy is most of the stand-ins' cost, and half of it is of kept slots'
        zero rows. Here a dropped slot of expert e costs three small ops and copies nothing:
        ``acc += w bias[e]``, then ``acc += w (x @ down[e]) @ up[e]``; kept slots and zero weights
        (the plain sentinel) cost nothing. Python ints in, so it suits a device where reading the
        slots back is free (CPU).

        Args:
            result: [1, H] the kept experts' sum for the token.
            hidden: [1, H] the token's input.
            slots: its K slot indices (kept e, dropped E + e).
            weights: their K weights.
        """
        views = self._views or self._views_of(*self._padded_factors())
        x = as_dtype(hidden, views[0][1].dtype)  # [1, H]
        # A model in another dtype than the sidecar's gets the sum once, as the batched form adds it.
        acc = result if result.dtype == x.dtype else torch.zeros_like(result, dtype=x.dtype)  # [1, H]
        for slot, weight in zip(slots, weights):
            if slot < num_experts or weight == 0.0:
                continue
            bias, down, up = views[slot - num_experts]  # [H], [H, r'], [r', H]
            acc.add_(bias, alpha=weight)
            acc.addmm_(torch.mm(x, down), up, alpha=weight)  # [1, r'] @ [r', H] (mm: one dispatch fewer than @)
        if acc is not result:
            result.add_(as_dtype(acc, result.dtype))
        return result

    def add_dropped_native(self, result: torch.Tensor, hidden: torch.Tensor, slots: torch.Tensor,
                           weights: torch.Tensor, num_experts: int) -> bool:
        """``add_dropped_one_token`` through the native kernel (runtime/native.py), reading the factors in
        half precision; False, with ``result`` untouched, where the kernel cannot serve this call.

        It serves float32 tensors on CPU outside autograd, and only stand-ins whose factors lie exactly
        on the half grid (planner.treatments fits them there): the kernel then multiplies by the
        very values the float32 forms use, and its sum differs from theirs only in float order.

        Args:
            result: [1, H] the kept experts' sum for the token, added to in place.
            hidden: [1, H] the token's input.
            slots: [1, K] int64 slot indices (kept e, dropped E + e).
            weights: [1, K] their float32 weights.
        """
        return self._add_native(result, hidden, slots, weights, num_experts)

    def add_dropped_native_rows(self, result: torch.Tensor, hidden: torch.Tensor, slots: torch.Tensor,
                                weights: torch.Tensor, num_experts: int) -> bool:
        """``add_dropped_native`` for each of a few tokens (small-batch decode), one kernel call per token;
        False, with ``result`` untouched, where the kernel cannot serve this call.

        At batch 8 the general form's copies of every dropped pair's factors (``rows``) cost more than the
        kernel reading them in half precision, token by token: on ref-olmoe's shapes about 0.2 ms a layer
        against a few tens of microseconds. Each token's sum differs from the general form's only in float
        order, as at batch 1.

        Args:
            result: [T, H] the kept experts' sums, added to in place.
            hidden: [T, H] the tokens' inputs.
            slots: [T, K] int64 slot indices (kept e, dropped E + e).
            weights: [T, K] their float32 weights.
        """
        return self._add_native(result, hidden, slots, weights, num_experts)

    def _add_native(self, result: torch.Tensor, hidden: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor,
                    num_experts: int, grouped: bool = False) -> bool:
        """The native kernel over each row of [T, H] ``result`` and ``hidden`` with its [T, K] ``slots`` and
        ``weights``, in one call (token by token, or ``grouped`` by expert); False, with ``result`` untouched,
        where the kernel cannot serve them."""
        tables = self._native
        if tables is None or slots.dim() != 2:
            return False
        kernel, down, up, bias = tables  # [E, H, r] and [E, r, H] half, [E, H] float32
        float32 = torch.float32
        tokens, width = slots.shape
        if (result.dtype != float32 or hidden.dtype != float32 or weights.dtype != float32
                or slots.dtype != torch.int64 or result.requires_grad or hidden.requires_grad
                or result.shape != (tokens, down.shape[1]) or hidden.shape != result.shape
                or weights.shape != slots.shape or not (result.is_contiguous() and hidden.is_contiguous()
                                                        and slots.is_contiguous() and weights.is_contiguous())):
            return False
        arguments = (width, slots.data_ptr(), weights.data_ptr(), num_experts, hidden.data_ptr(), result.data_ptr(),
                     down.data_ptr(), up.data_ptr(), bias.data_ptr(), *down.shape)
        if grouped:
            added = kernel.grouped(tokens, *arguments)
        else:
            added = kernel(*arguments) if tokens == 1 else kernel.rows(tokens, *arguments)
        if added == -1:
            raise RuntimeError(f"native stand-in kernel: a dropped slot in {slots.tolist()} names no expert"
                               f" of {down.shape[0]} (slots {num_experts}.. are dropped experts 0..)")
        if added < 0:
            raise MemoryError("native stand-in kernel: no memory for its scratch")
        return True

    def add_dropped_native_grouped(self, result: torch.Tensor, hidden: torch.Tensor, slots: torch.Tensor,
                                   weights: torch.Tensor, num_experts: int) -> bool:
        """``add_dropped_native_rows`` with the dropped pairs grouped by expert (prefill), in one call; False, with
        ``result`` untouched, where the kernel cannot serve this call.

        The kernel sorts the pairs by expert itself and reads each row of an expert's half-precision factors
        once per block of 4 of its pairs, where the token-by-token form reads every pair's factors again and
        ``grouped_rows`` needs float32 factors and a dozen ops per expert. The sum differs from the general
        form's only in float order.

        Args:
            result: [T, H] the kept experts' sums, added to in place.
            hidden: [T, H] the tokens' inputs.
            slots: [T, K] int64 slot indices (kept e, dropped E + e).
            weights: [T, K] their float32 weights.
        """
        return self._add_native(result, hidden, slots, weights, num_experts, grouped=True)

    def _native_tables(self) -> tuple | None:
        """(kernel, down [E, H, r] half, up [E, r, H] half, bias [E, H] float32), or None where the kernel
        is unavailable or the stand-ins are not float32 CPU factors exactly on the half grid. Built with
        the stand-ins (about 2 ms for 64 experts of [512, 56]), like ``_views``: the first decode step
        would otherwise pay for it."""
        if not (self.down.dtype == self.bias.dtype == torch.float32 and self.down.device.type == "cpu"
                and self.bias.shape[0] == self.down.shape[0]):
            return None
        kernel = standins_kernel()
        if kernel is None:
            return None
        # down in a buffer with 8 halves of slack after it: the kernel reads each row of r in whole vectors of 8.
        storage = torch.zeros(self.down.numel() + 8, dtype=torch.float16)
        down = storage[: self.down.numel()].view(self.down.shape).copy_(self.down)  # [E, H, r]
        up = self.up.half().contiguous()  # [E, r, H]
        # Exactly on the half grid (a value beyond half's range would come back infinite).
        if not (torch.equal(down.float(), self.down) and torch.equal(up.float(), self.up)):
            return None
        return kernel, down, up, self.bias.contiguous()

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor these stand-ins keep in memory: the constants, the padded factors (``down`` and ``up``
        are views of them) unless they are held once, the native kernel's half-precision tables, the one-token
        tables and the drop order."""
        held = [self.bias, *(self._padded or ()), *self._tables.values()]
        if self._native is not None:
            held += list(self._native[1:])
        if self.order is not None:
            held.append(self.order)
        return held

    def rows(self, inputs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Stand-in outputs [D, H] for inputs [D, H] of experts [D]."""
        # index_select rather than advanced indexing: the same copy at about half the cost, which
        # matters for the [D, H, r] weights of linear stand-ins.
        if self.bias.shape[0] == 1:  # one stand-in for the whole layer: a view, no gather
            out = self.bias.expand(experts.shape[0], -1)  # [D, H]
        else:
            out = self.bias.index_select(0, experts)  # [D, H]
        if self.down is not None:
            # One copy: the gathered half factors widened, which is exact (float32 is the compute dtype).
            dtype = self.bias.dtype if self._padded is None else self.down.dtype
            inner = torch.bmm(as_dtype(inputs[:, None, :], dtype),
                              self.down.index_select(0, experts).to(dtype))  # [D, 1, r]
            out = out + torch.bmm(inner, self.up.index_select(0, experts).to(dtype)).squeeze(1)  # [D, H]
        return out

    def grouped_rows(self, inputs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """``rows`` of linear stand-ins for inputs [D, H] of experts [D] in non-decreasing order, with one
        ``grouped_mm`` per factor: each expert's [H, r] and [r, H] are read once, not copied per row."""
        offsets = torch.cumsum(torch.bincount(experts, minlength=self.down.shape[0]), 0, dtype=torch.int32)  # [E]
        down, up = self._padded_factors(zero_row=False)  # [E, H, r'], [E, r', H]: the extra rank is zeros
        inner = grouped_matmul(inputs, down, offsets, transposed=True)  # [D, r']
        return self.bias.index_select(0, experts) + grouped_matmul(inner, up, offsets, transposed=True)  # [D, H]


def grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Rows of expert e (rows[offsets[e-1]:offsets[e]]) times expert e's weight.

    Args:
        rows: [P, in] inputs grouped by expert.
        weight: [E, out, in] (or [E, in, out] when ``transposed``).
        offsets: [E] int32 cumulative row counts.
    """
    w = weight if transposed else weight.transpose(-2, -1)  # [E, in, out]
    return torch.nn.functional.grouped_mm(rows.to(w.dtype), w, offs=offsets)  # [P, out]


# Loop over experts when active experts * this <= num_experts (see ActivePairs.use_loop).
_LOOP_WHEN_ACTIVE_FRACTION_BELOW = 8


@dataclass(frozen=True)
class ActivePairs:
    """The (token, expert) pairs that run, grouped by expert.

    Attributes:
        tokens: [P] token of each pair.
        weights: [P] its combine weight.
        expert_ids: [P] its expert, non-decreasing.
        offsets: [E] int32 cumulative pair counts per expert (grouped_mm's ``offs``).
        counts: [E] pairs per expert.
    """

    tokens: torch.Tensor
    weights: torch.Tensor
    expert_ids: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor
    # The experts that have rows, where the grouping already counted them in Python (few_active_pairs).
    active_experts: int | None = None

    def groups(self) -> list[tuple[int, int, int]]:
        """(expert, first row, end row) of every expert that has rows, in row order."""
        groups, start = [], 0
        for expert, count in enumerate(self.counts.tolist()):
            if count:
                groups.append((expert, start, start + count))
                start += count
        return groups

    def use_loop(self) -> bool:
        """Loop over the active experts when at most 1 in 8 has rows (on CPU; one grouped call elsewhere).

        On CPU an empty group costs ``grouped_mm`` about a tenth of what one more loop
        iteration costs in Python (measured on the dsv2-lite-small preset: 3 of 64
        experts active, looped 0.24 ms vs grouped 0.36 ms; 6 even; 12 or more, grouped wins).
        """
        if self.tokens.device.type != "cpu":
            return False
        active = self.active_experts if self.active_experts is not None else int((self.counts > 0).sum())
        return active * _LOOP_WHEN_ACTIVE_FRACTION_BELOW <= self.counts.numel()


def active_pairs(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> ActivePairs:
    """Drop sentinel slots (index >= num_experts) and group the rest by expert."""
    num_slots = top_k_index.shape[1]
    flat_index = top_k_index.reshape(-1)  # [T*K]
    active = (flat_index < num_experts).nonzero().squeeze(-1)  # [P] slots that run
    expert_ids, order = torch.sort(flat_index[active], stable=True)  # [P]
    slots = active[order]  # [P]
    counts = torch.bincount(expert_ids, minlength=num_experts)  # [E]
    return ActivePairs(
        tokens=slots // num_slots,
        weights=top_k_weights.reshape(-1)[slots],
        expert_ids=expert_ids,
        offsets=torch.cumsum(counts, 0, dtype=torch.int32),
        counts=counts,
    )


# The profiler range around the native experts kernel's call (its matmuls, gate and combine in one).
NATIVE_EXPERTS_RANGE = "allocplan::experts_few"
# The activation modules the native experts kernel's silu stands for.
_SILU = (SiLUActivation, torch.nn.SiLU)

# Up to this many tokens in a forward on CPU, ``active_pairs`` groups the pairs in Python on the slots read back
# (batched decode): a few dozen slots, where the general form's nine small ops each pay their fixed cost.
_FEW_TOKENS = 16


def grouped_pairs(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> ActivePairs:
    """``active_pairs``, through its short form for a few tokens on CPU where that may run."""
    if (1 < top_k_index.shape[0] <= _FEW_TOKENS and top_k_index.device.type == "cpu"
            and fast_paths().few_token_pairs and not top_k_weights.requires_grad):
        return few_active_pairs(top_k_index, top_k_weights, num_experts)
    return active_pairs(top_k_index, top_k_weights, num_experts)


def few_active_pairs(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> ActivePairs:
    """``active_pairs`` for a few tokens on CPU, grouped in Python on the slots read back: the same tensors.

    Python's sort is stable, as the general form's ``torch.sort(stable=True)``, so the pairs of one expert
    keep their slot order; the weights come back through their Python values, exact for every float dtype.
    """
    num_slots = top_k_index.shape[1]
    flat = top_k_index.reshape(-1).tolist()  # [T*K]
    slots = sorted((slot for slot, expert in enumerate(flat) if expert < num_experts), key=flat.__getitem__)
    counts = [0] * num_experts
    for slot in slots:
        counts[flat[slot]] += 1
    weights = top_k_weights.reshape(-1).tolist()  # [T*K]
    device = top_k_index.device
    # tokens and expert ids in one tensor, viewed apart: one construction instead of two.
    both = torch.tensor([slot // num_slots for slot in slots] + [flat[slot] for slot in slots] + counts,
                        dtype=torch.int64, device=device)  # [P + P + E]
    size = len(slots)
    return ActivePairs(
        tokens=both[:size],
        weights=torch.tensor([weights[slot] for slot in slots], dtype=top_k_weights.dtype, device=device),
        expert_ids=both[size : 2 * size],
        offsets=torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=device),
        counts=both[2 * size :],
        active_experts=sum(count > 0 for count in counts),
    )


def combine(out: torch.Tensor, pairs: ActivePairs, num_tokens: int) -> torch.Tensor:
    """Sum each pair's weighted output into its token: [P, H] -> [T, H]."""
    out = out * pairs.weights[:, None].to(out.dtype)  # [P, H]
    result = torch.zeros(num_tokens, out.shape[-1], dtype=out.dtype, device=out.device)  # [T, H]
    return result.index_add_(0, pairs.tokens, out)


def add_compensation(result: torch.Tensor, module: torch.nn.Module, hidden_states: torch.Tensor,
                     top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Add each dropped candidate's weight times its stand-in output to its token, in place.

    A dropped candidate of expert e arrives as index ``num_experts + e`` with its weight; the
    plain sentinel (index ``num_experts``, weight 0) adds nothing. ``result`` and
    ``hidden_states`` are [T, H].
    """
    stand_ins = getattr(module, COMPENSATION_ATTR, None)
    if stand_ins is None:
        return result
    if top_k_index.shape[0] == 1 and fast_paths().one_token_stand_ins:
        return _add_compensation_one_token(result, stand_ins, hidden_states, top_k_index, top_k_weights, num_experts)
    switches, linear_on_cpu = fast_paths(), stand_ins.down is not None and result.device.type == "cpu"
    if (linear_on_cpu and top_k_index.shape[0] <= _NATIVE_ROWS_UP_TO and switches.native_kernel
            and stand_ins.add_dropped_native_rows(result, hidden_states, top_k_index, top_k_weights, num_experts)):
        return result
    if (linear_on_cpu and switches.many_token_stand_ins and switches.native_kernel
            and stand_ins.add_dropped_native_grouped(result, hidden_states, top_k_index, top_k_weights, num_experts)):
        return result
    dropped = top_k_index >= num_experts  # [T, K]
    tokens, slots = dropped.nonzero(as_tuple=True)  # [D] each
    if tokens.numel():
        experts = top_k_index[tokens, slots] - num_experts  # [D]
        weights = top_k_weights[tokens, slots]  # [D]
        if stand_ins.down is not None and _group_the_stand_ins(stand_ins, tokens.numel(), num_experts):
            tokens, weights, rows = _grouped_linear_rows(stand_ins, hidden_states, tokens, experts, weights)
        else:
            rows = stand_ins.rows(hidden_states[tokens], experts)  # [D, H]
        weighted = rows * as_dtype(weights, stand_ins.bias.dtype)[:, None]  # [D, H]
        result.index_add_(0, tokens, as_dtype(weighted, result.dtype))
    return result


# Up to this many tokens in a forward, linear stand-ins on CPU go through the native kernel token by token
# (``StandIns.add_dropped_native_rows``) where it can serve them; more through its grouped form
# (``StandIns.add_dropped_native_grouped``), whose sort by expert and blocks pay off over many tokens.
_NATIVE_ROWS_UP_TO = 16
# The most bytes of factors ``StandIns.rows`` copies before grouping wins regardless (see below).
_STAND_IN_COPY_BYTES = 2 << 20


def _group_the_stand_ins(stand_ins: StandIns, dropped: int, num_experts: int) -> bool:
    """Whether ``dropped`` pairs' linear stand-ins run grouped by expert (``StandIns.grouped_rows``) rather than
    through a copy of each pair's factors (``StandIns.rows``).

    Grouping reads each expert's factors once but pays ``grouped_mm``'s per-expert cost; the copy pays
    for every pair's [H, r] and [r, H]. Measured on 2 CPU threads (rows / grouped time): below one pair
    per expert the copy always wins; above it, the copy still wins while it stays small, e.g. E = 16, H =
    128, r = 28 (ref-olmoe, 29 KB a pair): 0.40 at 19 pairs (batch-8 decode), 0.91 at 512, 1.49 at 1024;
    E = 64, H = 512, r = 8: 0.24 at 64 pairs, 0.65 at 512; but E = 8, H = 512, r = 100 (410 KB a pair):
    2.6 at 16 pairs. So grouping starts at one pair per expert once the copy passes 2 MiB.
    """
    if dropped < num_experts:
        return False
    # In the precision ``rows`` copies them: one copy's half tables are widened to the stand-ins' compute dtype.
    copied = stand_ins.bias if stand_ins._padded is None else stand_ins.down
    pair_bytes = (stand_ins.down[0].numel() + stand_ins.up[0].numel()) * copied.element_size()
    return dropped * pair_bytes > _STAND_IN_COPY_BYTES


def _grouped_linear_rows(stand_ins: StandIns, hidden_states: torch.Tensor, tokens: torch.Tensor,
                         experts: torch.Tensor, weights: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear stand-ins of many dropped pairs (prefill), grouped by expert (``StandIns.grouped_rows``),
    where ``StandIns.rows`` copies each pair's factors (with 768 dropped pairs per layer, tens of MB).
    Returns (tokens [D], weights [D], rows [D, H]) in expert order; below one pair per expert,
    copying the few pairs' factors is cheaper."""
    experts, order = torch.sort(experts, stable=True)  # [D]
    tokens, weights = tokens[order], weights[order]
    return tokens, weights, stand_ins.grouped_rows(hidden_states[tokens], experts)


def _add_compensation_one_token(result: torch.Tensor, stand_ins: StandIns, hidden_states: torch.Tensor,
                                top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                                num_experts: int) -> torch.Tensor:
    """``add_compensation`` for one token (batch-1 decode) over all K slots, without ``nonzero``.

    At batch 1 each op's fixed cost outweighs its arithmetic, so this form does as few as it
    can: the K slots' stand-in rows come with exact zeros for kept slots
    (:meth:`StandIns.one_token_rows`), and one ``addmm`` weights and sums them into the token,
    where the general form multiplies and then scatters with ``index_add_`` (about 20 us for
    one row on CPU). The sum is the general form's up to the order of its float additions.
    """
    switches = fast_paths()
    if stand_ins.down is not None and result.device.type == "cpu" and switches.stand_in_loop:
        if switches.native_kernel and stand_ins.add_dropped_native(result, hidden_states, top_k_index, top_k_weights,
                                                             num_experts):
            return result
        return stand_ins.add_dropped_one_token(result, hidden_states, top_k_index.tolist()[0],
                                               top_k_weights.tolist()[0], num_experts)
    rows = stand_ins.one_token_rows(hidden_states, top_k_index.reshape(-1), num_experts)  # [K, H]
    weights = as_dtype(top_k_weights, rows.dtype)  # [1, K]
    if result.dtype == rows.dtype:
        return result.addmm_(weights, rows)
    return result.add_(as_dtype(weights @ rows, result.dtype))


def ragged_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Experts forward over only the non-sentinel pairs (same result as ``eager``)."""
    # (Without autograd: decoding runs under no_grad or inference_mode, and the short form multiplies the
    # input itself where the general form multiplies a gathered copy.)
    if 0 < hidden_states.shape[0] <= _FEW_TOKENS:
        result = _native_few_experts(self, hidden_states, top_k_index, top_k_weights)
        if result is not None:
            return add_compensation(result, self, hidden_states, top_k_index, top_k_weights,
                                    self.num_experts).to(hidden_states.dtype)
    if (hidden_states.shape[0] == 1 and hidden_states.device.type == "cpu" and not torch.is_grad_enabled()
            and fast_paths().one_token_experts):
        return _one_token_experts(self, hidden_states, top_k_index, top_k_weights)
    pairs = grouped_pairs(top_k_index, top_k_weights, self.num_experts)
    rows = hidden_states[pairs.tokens]  # [P, H]
    if pairs.use_loop():
        out = _looped_experts(self, rows, pairs)  # [P, H]
    else:
        out = _grouped_experts(self, rows, pairs)  # [P, H]
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)
    result = combine(out, pairs, hidden_states.shape[0])
    return add_compensation(result, self, hidden_states, top_k_index, top_k_weights,
                            self.num_experts).to(hidden_states.dtype)


def _native_swiglu(self: torch.nn.Module) -> bool:
    """Whether the native kernel computes these experts as their own forward does: float32 [gate; up] weights,
    SiLU on the gate (transformers' default gate), no bias, no post-expert norm, not transposed."""
    gate_up, down = getattr(self, "gate_up_proj", None), getattr(self, "down_proj", None)
    flags = (getattr(self, name, None) for name in ("has_gate", "has_bias", "has_post_expert_norm", "is_transposed"))
    return (tuple(flags) == (True, False, False, False) and getattr(self, "is_concatenated", True)
            and getattr(type(self), "_apply_gate", None) is _default_apply_gate
            and type(getattr(self, "act_fn", None)) in _SILU and gate_up is not None and down is not None
            and gate_up.dtype == down.dtype == torch.float32 and gate_up.is_contiguous() and down.is_contiguous()
            and gate_up.shape[-2] == 2 * down.shape[-1])


def _native_few_experts(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor | None:
    """A few tokens' experts [T, H] through the native kernel (decoding on CPU, batch 1 included), or None where
    it cannot run them: off, not built, autograd on, another device, dtype or expert form (``_native_swiglu``).

    The general form's pairs, in its order, up to float rounding (native/experts_few.c): on CPU its grouped
    matmuls run one matmul per expert whether the expert has rows or not, and with 8 tokens those calls and the
    grouping around them cost several times the arithmetic.
    """
    if (hidden_states.device.type != "cpu" or torch.is_grad_enabled() or hidden_states.dtype != torch.float32
            or not fast_paths().native_few_token_experts):
        return None
    kernel = standins_kernel()
    if kernel is None or not _native_swiglu(self):
        return None
    x = hidden_states.contiguous()  # [T, H]
    index = top_k_index.to(torch.int64).contiguous()  # [T, K]
    weights = as_dtype(top_k_weights, torch.float32).contiguous()  # [T, K]
    out = torch.empty_like(x)  # [T, H]
    gate_up, down = self.gate_up_proj, self.down_proj  # [E, 2I, H], [E, H, I]
    arguments = (index.shape[0], index.shape[1], index.data_ptr(), weights.data_ptr(), self.num_experts, x.shape[1],
                 down.shape[-1], x.data_ptr(), gate_up.data_ptr(), down.data_ptr(), out.data_ptr())
    if torch.autograd._profiler_enabled():
        # A named range, so that a profile (allocplan.bench.breakdown) sees the call's time as the experts' work;
        # only under the profiler, as opening one costs about a microsecond.
        with torch.profiler.record_function(NATIVE_EXPERTS_RANGE):
            ran = kernel.experts_few(*arguments)
    else:
        ran = kernel.experts_few(*arguments)
    if ran < 0:  # its scratch could not be had: ``out`` was never written
        raise MemoryError("native experts kernel: no memory for its scratch")
    return out


def _project(rows: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """rows [n, in] times one expert's weight ([out, in], or [in, out] when ``transposed``)."""
    # torch.mm rather than @, and no cast when the dtypes agree: the same product with two fewer
    # dispatches, which batch-1 decode pays per expert and projection.
    return torch.mm(as_dtype(rows, weight.dtype), weight if transposed else weight.t())  # [n, out]


def _expert_mlp(self: torch.nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
    """Expert ``expert``'s output [n, H] for its rows ``x`` [n, H]."""
    if self.has_gate:
        up = _project(x, self.gate_up_proj[expert], self.is_transposed)  # [n, 2I]
        if self.has_bias:
            up = up + self.gate_up_proj_bias[expert]
        inner = self._apply_gate(up)  # [n, I]
    else:
        up = _project(x, self.up_proj[expert], self.is_transposed)  # [n, I]
        if self.has_bias:
            up = up + self.up_proj_bias[expert]
        inner = self.act_fn(up)
    y = _project(inner, self.down_proj[expert], self.is_transposed)  # [n, H]
    if self.has_bias:
        y = y + self.down_proj_bias[expert]
    return y


def _out_dim(self: torch.nn.Module) -> int:
    """The experts' output width H (down_proj is [E, H, I], or [E, I, H] when transposed)."""
    return self.down_proj.shape[-1] if self.is_transposed else self.down_proj.shape[-2]


def _looped_experts(self: torch.nn.Module, rows: torch.Tensor, pairs: ActivePairs) -> torch.Tensor:
    """[P, H] outputs, one small MLP per expert that has rows."""
    out = rows.new_empty(rows.shape[0], _out_dim(self), dtype=self.down_proj.dtype)  # [P, H]
    for expert, start, end in pairs.groups():
        out[start:end] = _expert_mlp(self, rows[start:end], expert)
    return out


def _one_token_experts(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> torch.Tensor:
    """``ragged_experts_forward``'s loop over experts for one token on CPU (batch-1 decode), bit for bit.

    The general form spends about twenty small ops per layer on bookkeeping (``active_pairs``:
    nonzero, sort, bincount, cumsum, gathers; ``combine``: a weighting and an ``index_add_``)
    before and after the one or few matmuls a token needs, and at batch 1 each op costs its
    fixed dispatch time. Here the token's K slots are read back once (free on CPU) and its
    experts run in expert order, each output weighted and added to the sum as ``combine`` does.
    """
    down = self.down_proj  # [E, H, I], or [E, I, H] when transposed
    experts = top_k_index.tolist()[0]
    # Weighted in the experts' dtype, as combine weights them (a Python float of that dtype's value).
    weights = as_dtype(top_k_weights, down.dtype).tolist()[0]
    # combine's index_add_ sums a 16-bit dtype's rows in float32 and rounds once, so this does too.
    reduced = down.dtype in (torch.bfloat16, torch.float16)
    result = None  # [1, H]: the first weighted output itself (0 + a is a), then the others added
    # combine sums the pairs in expert order (active_pairs sorts them), so this does too.
    for expert, weight in sorted((e, w) for e, w in zip(experts, weights) if e < self.num_experts):
        y = _expert_mlp(self, hidden_states, expert)  # [1, H]
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        y = y.mul_(weight).float() if reduced else y.mul_(weight)
        result = y if result is None else result.add_(y)
    if result is None:  # every slot dropped
        result = hidden_states.new_zeros(1, _out_dim(self), dtype=down.dtype)
    result = as_dtype(result, down.dtype)
    return add_compensation(result, self, hidden_states, top_k_index, top_k_weights,
                            self.num_experts).to(hidden_states.dtype)


def _grouped_experts(self: torch.nn.Module, rows: torch.Tensor, pairs: ActivePairs) -> torch.Tensor:
    """[P, H] outputs, one grouped matmul per projection over all experts."""
    if self.has_gate:
        up = grouped_matmul(rows, self.gate_up_proj, pairs.offsets, self.is_transposed)  # [P, 2I]
        if self.has_bias:
            up = up + self.gate_up_proj_bias[pairs.expert_ids]
        inner = self._apply_gate(up)  # [P, I]
    else:
        up = grouped_matmul(rows, self.up_proj, pairs.offsets, self.is_transposed)  # [P, I]
        if self.has_bias:
            up = up + self.up_proj_bias[pairs.expert_ids]
        inner = self.act_fn(up)
    out = grouped_matmul(inner, self.down_proj, pairs.offsets, self.is_transposed)  # [P, H]
    if self.has_bias:
        out = out + self.down_proj_bias[pairs.expert_ids]
    return out


class RaggedDbrxExperts(torch.nn.Module):
    """Stand-in for a ``DbrxExperts`` module that skips sentinel slots.

    DBRX's experts are not pluggable and its loop cannot skip the "no expert"
    index, so ``apply_plan`` swaps this module in (and back on remove). It holds
    the original ``mlp`` submodule under the same name, so parameter names and
    values are unchanged; w1, v1 and w2 are viewed as [E, F, H].
    """

    def __init__(self, original: torch.nn.Module) -> None:
        super().__init__()
        self.mlp = original.mlp
        self.hidden_size = original.hidden_size
        self.ffn_hidden_size = original.ffn_hidden_size
        self.num_experts = original.num_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, self.hidden_size)  # [T, H]
        pairs = grouped_pairs(top_k_index, top_k_weights, self.num_experts)
        split = (self.num_experts, self.ffn_hidden_size, self.hidden_size)
        rows = flat[pairs.tokens]  # [P, H]
        w1, v1, w2 = self.mlp.w1.view(split), self.mlp.v1.view(split), self.mlp.w2.view(split)
        if pairs.use_loop():
            out = rows.new_empty(rows.shape, dtype=w2.dtype)  # [P, H]
            for expert, start, end in pairs.groups():
                x = rows[start:end]  # [n, H]
                inner = self.mlp.activation_fn(_project(x, w1[expert], False)) * _project(x, v1[expert], False)
                out[start:end] = _project(inner, w2[expert], True)
        else:
            gate = grouped_matmul(rows, w1, pairs.offsets, False)  # [P, F]
            up = grouped_matmul(rows, v1, pairs.offsets, False)  # [P, F]
            inner = self.mlp.activation_fn(gate) * up  # [P, F]
            out = grouped_matmul(inner, w2, pairs.offsets, True)  # [P, H]
        result = add_compensation(combine(out, pairs, flat.shape[0]), self, flat, top_k_index, top_k_weights,
                                  self.num_experts)
        return result.to(hidden_states.dtype).view(shape)


# Experts modules that are not pluggable through ExpertsInterface: family name -> stand-in class.
EXPERTS_SWAPS: dict[str, type[torch.nn.Module]] = {"dbrx": RaggedDbrxExperts}


@contextmanager
def weights_in_place(module: torch.nn.Module) -> Iterator[None]:
    """Bring in the weights of a module that accelerate offloads (``device_map`` with CPU or disk
    offload), for code that runs its math without calling the module.

    accelerate's hooks load an offloaded module's weights only around its own forward
    (its parameters sit on the meta device otherwise); :func:`candidate_outputs` calls the
    experts' math directly, so it opens that window itself. Without hooks this does nothing.
    """
    hooked = [m for m in module.modules() if getattr(m, "_hf_hook", None) is not None]
    for m in hooked:
        m._hf_hook.pre_forward(m)
    try:
        yield
    finally:
        for m in reversed(hooked):
            m._hf_hook.post_forward(m, None)


def candidate_outputs(experts: torch.nn.Module, swap: str | None, hidden_states: torch.Tensor,
                      top_k_index: torch.Tensor) -> torch.Tensor:
    """Each candidate's unweighted expert output: [T, H] inputs, [T, K] experts -> [T, K, H].

    ``swap``: the family's ``experts_swap`` (its stand-in computes for a module that is not
    pluggable). One experts call per candidate slot, each over all T tokens. Offloaded
    weights (``device_map``) are brought in for the call.
    """
    with weights_in_place(experts):
        return _candidate_outputs(experts, swap, hidden_states, top_k_index)


def _candidate_outputs(experts: torch.nn.Module, swap: str | None, hidden_states: torch.Tensor,
                       top_k_index: torch.Tensor) -> torch.Tensor:
    if swap is not None:
        forward = EXPERTS_SWAPS[swap](experts)
    else:
        def forward(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            return ragged_experts_forward(experts, hidden, index, weights)
    ones = torch.ones(top_k_index.shape[0], 1, dtype=hidden_states.dtype, device=hidden_states.device)  # [T, 1]
    return torch.stack([forward(hidden_states, top_k_index[:, s : s + 1], ones)
                        for s in range(top_k_index.shape[1])], dim=1)


def register() -> str:
    """Make ``allocplan_ragged`` selectable (idempotent); returns its name."""
    if IMPLEMENTATION_NAME not in ExpertsInterface._global_mapping:
        ExpertsInterface.register(IMPLEMENTATION_NAME, ragged_experts_forward)
    return IMPLEMENTATION_NAME
