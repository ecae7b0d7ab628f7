"""Linear healing: replace each removed run of blocks by one linear map, folded into a kept weight.

The residual stream passes through 2L blocks, attention then MLP per layer: block 2l is layer l's
attention, 2l+1 its MLP, and boundary x is the stream entering block x (2l: layer l's input, 2L:
the stack's output). A removal (whole layers, lone attention and MLP blocks) is a set of blocks;
for a maximal run of removed blocks i..j, the kept block p = i-1 ends by adding its output M to the
stream. Healing fits A so that the pruned model's stream after block p, S_p+1 + M·A, matches what
the unpruned model carried at boundary j+1, and folds the map into the block's output projection
(the MLP's down projection, or attention's output projection): M·(I + A) is that projection with
its weight multiplied by (I + A). A run of whole layers is the runs of ReplaceMe (Shopkhoev et al.
2025): the preceding layer's MLP maps onto the stream after the run. The healed model keeps its
architecture and parameter count, so stock `transformers` loads it.

The fit is least squares with a ridge on A: it shrinks towards leaving the model unhealed (A = 0),
never towards deleting the MLP. Windows: the fitting windows are their own tokens, taken from the
corpus beside the calibration windows and never from the held-out ones.

No token's activations are held in memory beyond one batch: the least-squares problem only needs MᵀM
and MᵀY (float64, d² each whatever the number of tokens). `collect_fit_stats` writes the unpruned
stream and block outputs to scratch files; the sums of a run are taken from them the first time a fit
needs that run (`add_pairs`: one read of the files, no forward pass), and at most SUMS_BYTES of them
are kept, least recently used first out, counting those of the passes sequential fits continue from
(below). Summing every run a study could remove up front would hold one d² matrix per (block, run
length): tens of them per block in a sub-layer space, far more than fits a GPU at d = 4096. Fitting a
run that the unpruned model leads into is then a solve. Runs are fitted in order; with `sequential`,
each later run is fitted on the model already pruned and healed before it (the errors it must correct),
which only a pass of that model over the fitting windows shows. That pass is progressive: it starts
after the previous run, fed the state its fit left (the unpruned stream plus the previous map's output,
read back from scratch files on disk, evaluators/scratch.py), and runs only the kept layers up to the
next run, not the stack from the first changed layer again.

A run that starts at block 0 has no preceding block and stays unhealed (reported, never faked). A
family whose block outputs pass through a norm before the residual add cannot fold a map exactly:
`fold_reason` names it and the caller refuses. Whole-layer removals only ever need MLP outputs and
layer boundaries (`blocks=False`: what is summed and kept on disk is what it was before blocks).
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from evaluators.forward import numerics, prepare
from evaluators.perplexity import window_batches
from evaluators.scratch import Scratch
from search.model.architectures import architecture_of
from search.model.numerics import mixed_precision
from search.model.removal import Removal
from search.model.surgery import decoder_layers, removal_applied

DEFAULT_RIDGE = 1e-2  # relative to the mean diagonal of M^T M
CAPTURES = 16  # captures kept per fitting set (on disk, two batches' worth of tensors per fitting batch each)
SUMS_BYTES = 2 << 30  # sums kept in memory between fits, the captures' included (each summed again from disk)


def attention_block(layer: int) -> int:
    return 2 * layer


def mlp_block(layer: int) -> int:
    return 2 * layer + 1


def removed_blocks(removal: Removal) -> list[int]:
    """The removal's blocks in stream order (a whole layer is both of its blocks)."""
    return sorted(attention_block(i) if kind == "attn" else mlp_block(i) for i, kind in removal.blocks())


def runs(blocks: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive removed blocks, as (first, last)."""
    found: list[tuple[int, int]] = []
    for block in sorted(set(blocks)):
        if found and found[-1][1] == block - 1:
            found[-1] = (found[-1][0], block)
        else:
            found.append((block, block))
    return found


def _layer_span(run: tuple[int, int]) -> tuple[int, int]:
    return run[0] // 2, run[1] // 2


def unreachable_runs(removal: Removal) -> tuple[tuple[int, int], ...]:
    """The run no preceding block can heal (the one starting at block 0), as the layers it spans."""
    return tuple(_layer_span(run) for run in runs(removed_blocks(removal)) if run[0] == 0)


def fold_reason(model: nn.Module, blocks: bool = False) -> str:
    """Why this family cannot be healed by folding ("" when it can); `blocks`: runs that may end at an
    attention block too, whose map folds into attention's output projection."""
    arch = architecture_of(model)
    if arch.mlp_output is None or (blocks and arch.attention_output is None):
        return f"{arch.name}: {arch.no_fold}"
    return ""


def output_projection(model: nn.Module, block: int) -> nn.Module:
    """The module whose output `block` adds to the residual stream last: its MLP's down projection, or
    attention's output projection."""
    arch = architecture_of(model)
    path = arch.mlp_output if block % 2 else arch.attention_output
    if path is None:
        raise ValueError(fold_reason(model, blocks=True))
    module = decoder_layers(model)[block // 2]
    for name in path.split("."):
        module = getattr(module, name)
    return module


@dataclass(frozen=True)
class Healing:
    """The maps of one removal set: preceding block -> A, and the run left unhealed (it starts at block
    0; as the layers it spans)."""

    maps: dict[int, torch.Tensor]
    unhealed: tuple[tuple[int, int], ...] = ()

    @property
    def first_changed(self) -> int | None:
        """The first layer whose weights healing changes: a prefix must start at or before it."""
        return min(self.maps) // 2 if self.maps else None

    def folded_into(self) -> dict[str, str]:
        """For pruning.json: layer -> the projection its map is folded into (one per layer at most: a map
        on attention means its MLP was removed)."""
        kind = {0: "attention", 1: "MLP"}
        return {str(b // 2): f"layer {b // 2} {kind[b % 2]} output projection" for b in sorted(self.maps)}


def _fold(module: nn.Module, mix: torch.Tensor) -> None:
    """Make `module`'s output y become y·mix (mix = I + A, [d, d]) by rewriting its weight and bias."""
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    mix = mix.to(weight.device, torch.float64)  # products in float64, rounded once to the weight's dtype
    with torch.no_grad():
        if isinstance(module, nn.Linear):  # y = x W^T + b, W [d, in]: W' = mix^T W
            weight.copy_(mix.T @ weight.double())
        else:  # transformers' Conv1D (GPT-2): y = x W + b, W [in, d]: W' = W mix
            weight.copy_(weight.double() @ mix)
        bias = getattr(module, "bias", None)
        if bias is not None:
            bias.copy_(bias.double() @ mix)


@contextmanager
def healed(model: nn.Module, healing: Healing) -> Iterator[nn.Module]:
    """Run the block with the maps folded in (into the unpruned stack's indices); restores the weights."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its value before folding)
    try:
        for block, delta in healing.maps.items():
            module = output_projection(model, block)
            parameters: list[Any] = [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]
            saved += [(p, p.detach().clone()) for p in parameters]
            _fold(module, _mix(delta))
        yield model
    finally:
        with torch.no_grad():
            for parameter, value in reversed(saved):
                parameter.copy_(value)


def fold_permanently(model: nn.Module, healing: Healing) -> None:
    """Fold the maps for good (export): the weights stay healed."""
    for block, delta in healing.maps.items():
        _fold(output_projection(model, block), _mix(delta))


def _mix(delta: torch.Tensor) -> torch.Tensor:
    return torch.eye(delta.shape[0], dtype=delta.dtype, device=delta.device) + delta


class _Stop(Exception):
    """Raised by a hook once the layers a pass needs have run: the rest of the stack is skipped."""


def _output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _tokens(states: torch.Tensor) -> torch.Tensor:
    """[batch, seq, d] -> [tokens, d] without each window's first position (BOS or context-only), in at
    least float32 (a float64 model keeps float64: the tests compare sums at that precision)."""
    return states[:, 1:].reshape(-1, states.shape[-1]).to(torch.promote_types(states.dtype, torch.float32))


def _product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Σ over a batch's tokens of leftᵀ right: float32 (or the model's float64) products, float64 sums."""
    return (_tokens(left).T @ _tokens(right.to(left.device))).double()  # on left's device (--device-map)


def _add(sums: dict, key: Any, value: torch.Tensor) -> None:
    sums[key] = sums[key] + value if key in sums else value


Pair = tuple[int, int]  # (p, b): the output of block p against the residual stream at boundary b


def run_pairs(removal: Removal) -> set[Pair]:
    """The statistics a fit of `removal` reads: (p, b) for each healable run i..j, p = i-1, b = j+1."""
    return {(first - 1, last + 1) for first, last in runs(removed_blocks(removal)) if first > 0}


def all_pairs(n_layers: int, max_run: int, blocks: bool = False) -> set[Pair]:
    """Every (p, b) a run of at most `max_run` whole layers can need (b = 2 n_layers: the stack's output);
    with `blocks`, every run of at most 2 `max_run` + 1 blocks after any block."""
    end = 2 * n_layers
    if not blocks:
        layers = [(p, p + 1 + k) for p in range(n_layers - 1) for k in range(1, max_run + 1)]
        return {(mlp_block(p), 2 * b) for p, b in layers if b <= n_layers}
    return {(p, p + 1 + k) for p in range(end - 1) for k in range(1, 2 * max_run + 2) if p + 1 + k <= end}


@dataclass
class FitStats:
    """What the maps are solved from, over the fitting windows (the held-out windows never enter):
    for the unpruned stack, Σ MᵀM of block p's output (`gram`) and Σ Mᵀ(S_b - S_p+1), S_x the
    residual stream at boundary x (`cross`), in float64, O(d²) each whatever the number of tokens;
    and the stream at every boundary and every block's output, per batch on disk (`states`: keys "s<x>"
    and "m<p>"), read back one batch at a time: what those sums are summed from when a fit first needs
    them, and what sequential fits of later runs start from. Layer boundaries and MLP outputs, and with
    `blocks` the mid-layer boundaries and attention outputs too.
    `narrow`: the streams are stored in a narrower dtype than the residual's (bf16 under bf16-mixed), so
    a run's target S_b - S_p+1, summed again from disk, is the sum of the block outputs between (stored
    in the dtype they were computed in, every block's), not a difference of two rounded streams."""

    windows: torch.Tensor
    bos_id: int | None
    batch_size: int
    tokens: int  # fitted positions over all fitting windows
    gram: OrderedDict[int, torch.Tensor]
    cross: OrderedDict[Pair, torch.Tensor]
    states: Scratch | None = None
    blocks: bool = False
    narrow: bool = False
    # (ridge, runs before a layer, that layer) -> its capture on the model healed that far: sets sharing those
    # runs (a greedy stage's candidates, a sampler's neighbours) continue from it instead of running again.
    captures: OrderedDict[tuple, _Capture] = field(default_factory=OrderedDict, repr=False)

    @property
    def batches(self) -> int:
        return math.ceil(len(self.windows) / self.batch_size)

    def close_captures(self) -> None:
        for capture in self.captures.values():
            capture.close()
        self.captures.clear()

    def close(self) -> None:
        self.close_captures()
        if self.states is not None:
            self.states.close()


@torch.inference_mode()
def collect_fit_stats(
    model: nn.Module,
    windows: torch.Tensor,
    bos_id: int | None,
    batch_size: int,
    pairs: set[Pair],
    keep_states: bool = True,
    blocks: bool = False,
) -> FitStats:
    """One pass of the unpruned stack (no LM head) over the fitting windows, summing the statistics of
    `pairs` and, with `keep_states`, writing the stream at each boundary and each block's output to
    scratch files (what sequential fits of later runs start from; `blocks`: the mid-layer ones too,
    which runs of lone blocks start from). Held in memory: the current batch's block outputs and
    residual states that a later boundary of the same batch still needs, nothing across batches."""
    prepare(model)  # before the hooks: the fused-head probe runs a batch of its own
    layers = decoder_layers(model)
    n = len(layers)
    blocks = blocks or any(p % 2 == 0 or b % 2 for p, b in pairs)
    # On disk in the dtype the layers compute in (bf16 under bf16-mixed: half the bytes to write and read
    # back; measured to move healed ratios by at most 0.001), read back into the residual stream's dtype.
    weights = next(model.parameters()).dtype
    stored = mixed_precision(model) or weights
    narrow = keep_states and stored != weights
    stats = FitStats(
        windows, bos_id, batch_size, 0, OrderedDict(), OrderedDict(), Scratch() if keep_states else None, blocks, narrow
    )
    every = range(2 * n) if blocks or narrow else [mlp_block(i) for i in range(n)]
    sources = set(every) if keep_states else {p for p, _ in pairs}
    targets: dict[int, list[int]] = {}  # b -> the p paired with it
    for p, b in sorted(pairs):
        targets.setdefault(b, []).append(p)
    top = 2 * n if keep_states else max((b for _, b in pairs), default=0)
    outputs: dict[int, torch.Tensor] = {}  # this batch: p -> M_p
    after: dict[int, torch.Tensor] = {}  # this batch: p -> S_p+1
    batch = [0]

    def boundary(x: int, state: torch.Tensor) -> None:
        """The residual stream at boundary x (x = 2n: the stack's output) of the current batch."""
        if stats.states is not None:
            stats.states.put(f"s{x}", batch[0], state.to(stored))
        if x - 1 in outputs:
            after[x - 1] = state
        for p in targets.get(x, ()):
            _add(stats.cross, (p, x), _product(outputs[p], state - after[p].to(state.device)))
        if x >= top:
            raise _Stop

    def keep_input(module, args, kwargs, index=0):
        boundary(index, _input(args, kwargs).detach())

    def keep_output(module, args, output, index=0):
        m = _output(output).detach()
        if stats.states is not None:
            stats.states.put(f"m{index}", batch[0], m)
        if index in pairs_from:
            _add(stats.gram, index, _product(m, m))
            outputs[index] = m

    def keep_last(module, args, output):
        boundary(2 * n, _output(output).detach())

    pairs_from = {p for p, _ in pairs}
    handles = [
        layer.register_forward_pre_hook(partial(keep_input, index=attention_block(i)), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    if blocks:  # the MLP block's first module (its norm) reads the stream between the two blocks
        first = architecture_of(model).mlp_block[0]
        hook = keep_input
        handles += [
            layer.get_submodule(first).register_forward_pre_hook(partial(hook, index=mlp_block(i)), with_kwargs=True)
            for i, layer in enumerate(layers)
        ]
    handles += [
        output_projection(model, p).register_forward_hook(partial(keep_output, index=p)) for p in sorted(sources)
    ]
    handles.append(layers[n - 1].register_forward_hook(keep_last))
    causal_lm: Any = model
    try:
        if top > 0:
            for index, inputs in enumerate(
                window_batches(windows, bos_id, batch_size, next(model.parameters()).device)
            ):
                batch[0] = index
                try:
                    with numerics(model):
                        causal_lm.base_model(input_ids=inputs, use_cache=False)
                except _Stop:
                    pass
                finally:
                    outputs.clear()
                    after.clear()
                stats.tokens += inputs.shape[0] * (inputs.shape[1] - 1)
    except BaseException:
        stats.close()
        raise
    finally:
        for handle in handles:
            handle.remove()
    return stats


def add_pairs(model: nn.Module, stats: FitStats, pairs: set[Pair]) -> None:
    """Sum the statistics of `pairs` not summed yet: from the fitting states on disk where the first pass
    kept them (the same operands the pass would have multiplied), else by another pass of the unpruned
    model. Those asked for become the most recently used."""
    missing = {pair for pair in pairs if pair not in stats.cross}
    if missing and stats.states is None:
        more = collect_fit_stats(model, stats.windows, stats.bos_id, stats.batch_size, missing, False, stats.blocks)
        stats.cross.update(more.cross)
        for p, gram in more.gram.items():
            stats.gram.setdefault(p, gram)
    elif missing:
        _sum_from_states(model, stats, missing)
    for p, b in sorted(pairs):
        stats.cross.move_to_end((p, b))
        stats.gram.move_to_end(p)


@torch.inference_mode()
def _sum_from_states(model: nn.Module, stats: FitStats, pairs: set[Pair]) -> None:
    """Σ MᵀM and Σ Mᵀ(S_b - S_p+1) of `pairs` from the scratch files, batch by batch, under the model's
    numerics: the products `collect_fit_stats` takes in its pass, on the tensors it wrote (the streams
    themselves, or with `narrow` the block outputs that make up their difference)."""
    assert stats.states is not None
    states, device = stats.states, next(model.parameters()).device
    residual = next(model.parameters()).dtype
    grams = {p for p, _ in pairs if p not in stats.gram}
    for index in range(stats.batches):
        outputs = {p: states.get(f"m{p}", index, device) for p in sorted({p for p, _ in pairs})}
        with numerics(model):
            for p in sorted(grams):
                _add(stats.gram, p, _product(outputs[p], outputs[p]))
            for p, b in sorted(pairs):
                _add(stats.cross, (p, b), _product(outputs[p], _target(stats, p, b, index, device, residual)))


def _target(stats: FitStats, p: int, b: int, index: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """S_b - S_p+1 of batch `index` in the residual's dtype: what the blocks p+1..b-1 added to the stream."""
    assert stats.states is not None
    read = partial(stats.states.get, index=index, device=device)
    if not stats.narrow:
        return read(f"s{b}").to(dtype) - read(f"s{p + 1}").to(dtype)
    total = read(f"m{p + 1}").to(dtype)
    for x in range(p + 2, b):
        total += read(f"m{x}").to(dtype)
    return total


def _trim_sums(stats: FitStats) -> None:
    """Drop sums past SUMS_BYTES (after a fit: none in use is dropped under it), each summed again from
    disk when a fit needs it: first the captures' (least recently used capture first), then the unpruned
    model's (least recently used run first; a block's MᵀM goes with the last of its runs)."""
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    held = sum(size(t) for t in [*stats.gram.values(), *stats.cross.values()])
    held += sum(size(t) for capture in stats.captures.values() for t in capture.sums())
    for capture in stats.captures.values():
        if held <= SUMS_BYTES:
            break
        held -= sum(size(t) for t in capture.sums())
        capture.gram = None
        capture.cross.clear()
    runs_of = Counter(p for p, _ in stats.cross)
    while held > SUMS_BYTES and stats.cross:
        (p, _), cross = stats.cross.popitem(last=False)
        held -= size(cross)
        runs_of[p] -= 1
        if not runs_of[p] and p in stats.gram:
            held -= size(stats.gram.pop(p))


@dataclass
class _Capture:
    """One kept block's output and the stream after it on every fitting window (per batch, on disk), in
    the model pruned and healed up to it, and the sums fits read from them: whatever run follows that
    block, its map is a solve from here, and the run after it continues from here."""

    scratch: Scratch  # "m", "out" per batch
    gram: torch.Tensor | None  # Σ M'ᵀM' (None: dropped under SUMS_BYTES, summed again from "m" when needed)
    cross: dict[int, torch.Tensor]  # boundary b -> Σ M'ᵀ(S_b - out')
    device: torch.device  # where the block ran (its layer's device), and where its sums are taken

    def sums(self) -> list[torch.Tensor]:
        return [*([] if self.gram is None else [self.gram]), *self.cross.values()]

    def close(self) -> None:
        self.scratch.close()


@torch.inference_mode()
def _capture(
    model: nn.Module,
    stats: FitStats,
    removal: Removal,
    start: int,
    feed: Callable[[int], torch.Tensor],
    block: int,
) -> _Capture:
    """Run the pruned model healed so far from kept block `start` (fed `feed(batch)`, the state the
    previous run's fit left) to `block` over the fitting windows, keeping that block's output and the
    stream after it.

    In layers: from `start`'s layer to `block`'s. Where `start` is an MLP, its layer's attention ended the
    previous run, so it is skipped and the layer's input is the stream entering the MLP; where `block` is
    an attention block, its MLP begins the run that follows, so it is skipped and the layer's output is
    the stream after the attention."""
    device = next(model.parameters()).device
    captured: dict[str, torch.Tensor] = {}
    current: list[torch.Tensor] = []

    def feed_hook(module, args, kwargs):
        if args:
            return (current[0], *args[1:]), kwargs
        kwargs["hidden_states"] = current[0]
        return args, kwargs

    def keep_mlp(module, args, output):
        captured["m"] = _output(output).detach()

    def stop(module, args, output):
        captured["out"] = _output(output).detach()
        raise _Stop

    causal_lm: Any = model
    projection, layer_module = output_projection(model, block), decoder_layers(model)[block // 2]
    before = Removal.of([*range(start // 2), *removal.layers], removal.attention, removal.mlp)
    found = _Capture(Scratch(), None, {}, device)
    gram: torch.Tensor | None = None
    try:
        with removal_applied(model, before):
            handles = [
                decoder_layers(model)[0].register_forward_pre_hook(feed_hook, with_kwargs=True),
                projection.register_forward_hook(keep_mlp),
                layer_module.register_forward_hook(stop),
            ]
            try:
                for index, inputs in enumerate(window_batches(stats.windows, stats.bos_id, stats.batch_size, device)):
                    current[:] = [feed(index)]
                    try:
                        with numerics(model):
                            causal_lm.base_model(input_ids=inputs, use_cache=False)
                    except _Stop:
                        pass
                    m, out = captured.pop("m"), captured.pop("out")
                    gram = _product(m, m) if gram is None else gram + _product(m, m)
                    found.scratch.put("m", index, m)
                    found.scratch.put("out", index, out.to(m.dtype))  # as the fitting states: the compute dtype
            finally:
                for handle in handles:
                    handle.remove()
    except BaseException:
        found.close()
        raise
    assert gram is not None, "the fitting windows have at least one batch"
    found.gram, found.device = gram, gram.device
    return found


def _gram(stats: FitStats, capture: _Capture) -> torch.Tensor:
    """Σ M'ᵀM' over the fitting windows: kept from the capture's pass, or summed again from its files
    (the same operands in the same order, so the same sum)."""
    if capture.gram is None:
        total: torch.Tensor | None = None
        for index in range(stats.batches):
            m = capture.scratch.get("m", index, capture.device)
            total = _product(m, m) if total is None else total + _product(m, m)
        capture.gram = total
    assert capture.gram is not None, "the fitting windows have at least one batch"
    return capture.gram


def _cross(stats: FitStats, capture: _Capture, target: int, device: torch.device) -> torch.Tensor:
    """Σ M'ᵀ(S_target - out') over the fitting windows, S_target the unpruned stream (from disk)."""
    if target not in capture.cross:
        assert stats.states is not None
        total: torch.Tensor | None = None
        for index in range(stats.batches):
            m = capture.scratch.get("m", index, device)
            dtype = torch.promote_types(m.dtype, torch.float32)
            out = capture.scratch.get("out", index, device).to(dtype)
            value = _product(m, stats.states.get(f"s{target}", index, device).to(dtype) - out)
            total = value if total is None else total + value
        assert total is not None
        capture.cross[target] = total
    return capture.cross[target]


def solve(mm: torch.Tensor, my: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_A |M A - Y|^2 + lam |A|^2, lam = ridge x the mean of diag(M^T M)."""
    lam = ridge * mm.diagonal().mean()
    eye = torch.eye(mm.shape[0], dtype=mm.dtype, device=mm.device)
    return torch.linalg.solve(mm + lam * eye, my)


def _healed_state(out: torch.Tensor, m: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The stream after a kept block with that block's output mapped by (I + delta): out + M·delta."""
    return out + (m.to(out.dtype) @ delta.to(out.device, out.dtype))


def fit_healing(
    model: nn.Module,
    stats: FitStats,
    removal: Removal,
    ridge: float = DEFAULT_RIDGE,
    sequential: bool = True,
) -> Healing:
    """One map per removed run of blocks (see the module docstring); the model is left as it was.

    The first healable run sees the unpruned model up to its preceding block, so its map comes from the
    streamed sums alone. With `sequential`, run r+1 is fitted on the model pruned and healed up to run
    r: one pass over the fitting windows through the kept blocks between the two runs, fed the state
    after run r (the stream after its preceding block plus that block's mapped output: the unpruned
    states on disk after the first run, the previous pass's after later ones)."""
    if not removal.whole_layers_only and sequential and not stats.blocks:
        raise ValueError("runs of lone blocks start mid-layer: collect_fit_stats(blocks=True)")
    device, residual = next(model.parameters()).device, next(model.parameters()).dtype
    states = stats.states
    if sequential and states is None:
        raise ValueError("sequential fits need the fitting states (collect_fit_stats(keep_states=True))")
    found = runs(removed_blocks(removal))
    # The runs solved from the unpruned model's sums: every one, or sequentially only the first.
    direct = found if not sequential else found[:1]
    add_pairs(model, stats, {(first - 1, last + 1) for first, last in direct if first > 0})
    maps: dict[int, torch.Tensor] = {}
    unhealed: list[tuple[int, int]] = []
    state: Callable[[int], torch.Tensor] | None = None  # batch -> the stream after the last run; None: unchanged
    end = 0  # the last block of the previous run
    for number, (first, last) in enumerate(found):
        block, target = first - 1, last + 1  # the kept block before the run, the boundary after it
        if first == 0:
            unhealed.append(_layer_span((first, last)))
            if states is not None:
                state = partial(_state, states, "s0", None, None, device, residual)  # from the embedding
        elif not sequential or state is None:  # nothing before it changed: the unpruned sums are its own
            maps[block] = solve(stats.gram[block], stats.cross[(block, target)], ridge)
            if states is not None:
                state = partial(_state, states, f"s{first}", f"m{block}", maps[block], device, residual)
        else:
            key = (ridge, tuple(found[:number]), block)  # what the model up to `block` is: the runs before it
            capture = stats.captures.get(key)
            if capture is None:
                capture = stats.captures[key] = _capture(model, stats, removal, end + 1, state, block)
            stats.captures.move_to_end(key)
            maps[block] = solve(_gram(stats, capture), _cross(stats, capture, target, capture.device), ridge)
            state = partial(_state, capture.scratch, "out", "m", maps[block], device, residual)
        end = last
    while len(stats.captures) > CAPTURES:  # after the fit: a capture in use is never closed under it
        stats.captures.pop(next(iter(stats.captures))).close()
    _trim_sums(stats)
    return Healing(maps, tuple(unhealed))


def _state(
    scratch: Scratch,
    out: str,
    mlp: str | None,
    delta: torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
    index: int,
) -> torch.Tensor:
    """Batch `index` of a stored stream in the residual's `dtype`, with the mapped block output added when
    a run was healed there."""
    stream = scratch.get(out, index, device).to(dtype)
    if mlp is None or delta is None:
        return stream
    return _healed_state(stream, scratch.get(mlp, index, device), delta)
