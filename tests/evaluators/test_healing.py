"""Linear healing: folding is exact in every family that allows it; the streamed sums and the progressive
sequential fit equal the least-squares problem set up on activations held and computed independently
here, for runs of whole layers and of lone blocks; healed perplexity from the prefix cache is the plain
forward pass's."""

import math

import pytest
import torch

import evaluators.healing
from evaluators.healing import (
    DEFAULT_RIDGE,
    Healing,
    add_pairs,
    all_pairs,
    collect_fit_stats,
    fit_healing,
    fold_permanently,
    fold_reason,
    healed,
    output_projection,
    removed_blocks,
    run_pairs,
    runs,
    solve,
    unreachable_runs,
)
from evaluators.perplexity import perplexity
from evaluators.prefix import build_prefix_cache
from search.errors import SearchError
from search.healing import check_healable
from search.model.numerics import apply_numerics
from search.model.removal import Removal
from search.model.surgery import decoder_layers, removal_applied
from tests.conftest import FAMILIES, VOCAB, tiny_model

FOLDABLE = [f for f in FAMILIES if f != "gemma3"]


def test_runs_are_maximal_consecutive_stretches_of_blocks():
    assert runs([5, 1, 2, 7, 8, 9]) == [(1, 2), (5, 5), (7, 9)]
    assert runs([]) == []
    # Block 2l is layer l's attention, 2l+1 its MLP: layer 1 whole, then layer 2's attention, layer 4's MLP.
    assert removed_blocks(Removal.of([1], attention=[2], mlp=[4])) == [2, 3, 4, 9]
    assert runs(removed_blocks(Removal.of(attention=[2, 3]))) == [(4, 4), (6, 6)]  # an MLP between them


@pytest.mark.parametrize("family", FOLDABLE)
@pytest.mark.parametrize("block", [5, 4], ids=["mlp", "attention"])
def test_folding_equals_mapping_the_block_output(family, block):
    model = tiny_model(family, layers=4)
    inputs = torch.randint(3, VOCAB, (2, 12))
    delta = torch.randn(32, 32, dtype=torch.float64) * 0.1
    projection = output_projection(model, block)  # layer 2's MLP or attention output projection
    handle = projection.register_forward_hook(lambda m, a, out: out @ (torch.eye(32) + delta.float()))
    with torch.no_grad():
        mapped = model(input_ids=inputs).logits
    handle.remove()
    before = [p.clone() for p in model.parameters()]
    with torch.no_grad(), healed(model, Healing({block: delta})):
        folded = model(input_ids=inputs).logits
    assert torch.allclose(folded, mapped, atol=1e-5, rtol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # restored exactly


def test_a_family_with_a_norm_after_its_blocks_is_refused_in_one_line():
    model = tiny_model("gemma3", layers=4)
    assert "post_feedforward_layernorm" in fold_reason(model) and fold_reason(model, blocks=True)
    for blocks in (False, True):
        with pytest.raises(SearchError, match=r"^--heal linear is not available for this model: gemma3: ") as info:
            check_healable(model, "linear", blocks)
        assert "\n" not in str(info.value)
    check_healable(model, "none", blocks=True)  # unhealed search works on every family


def _dense(model, windows, width=32):
    """Independently of healing.py: the unpruned stream at every boundary (2l: layer l's input, 2l+1:
    that input plus its attention output, 2L: the last layer's output before the final norm) and every
    block's output, every window held at once, without each window's first position."""
    n = len(decoder_layers(model))
    outputs, last = {}, []
    handles = [
        output_projection(model, b).register_forward_hook(lambda m, a, out, b=b: outputs.__setitem__(b, out))
        for b in range(2 * n)
    ]
    handles.append(
        decoder_layers(model)[-1].register_forward_hook(
            lambda m, a, out: last.append(out[0] if isinstance(out, tuple) else out)
        )
    )
    with torch.no_grad():
        hidden = list(model(input_ids=windows, output_hidden_states=True).hidden_states)
    for handle in handles:
        handle.remove()
    stream = {}
    for layer in range(n):
        stream[2 * layer] = hidden[layer]
        stream[2 * layer + 1] = hidden[layer] + outputs[2 * layer]
    stream[2 * n] = last[-1]  # output_hidden_states' last entry is after the final norm
    flat = lambda h: h[:, 1:].reshape(-1, width).double()  # noqa: E731
    return {b: flat(o) for b, o in outputs.items()}, {x: flat(h) for x, h in stream.items()}


def _pruned(model, windows, removal, block, width=32):
    """Block `block`'s output and the stream after it in the model with `removal` applied (`block` kept,
    the block after it removed): the output of `block`'s layer."""
    found = {}
    projection, layer = output_projection(model, block), decoder_layers(model)[block // 2]
    with torch.no_grad(), removal_applied(model, removal):
        handles = [
            projection.register_forward_hook(lambda m, a, out: found.__setitem__("m", out)),
            layer.register_forward_hook(
                lambda m, a, out: found.__setitem__("out", out[0] if isinstance(out, tuple) else out)
            ),
        ]
        model(input_ids=windows)
        for handle in handles:
            handle.remove()
    return (found[k][:, 1:].reshape(-1, width).double() for k in ("m", "out"))


def _of_blocks(blocks):
    return Removal.from_blocks((b // 2, "attn" if b % 2 == 0 else "mlp") for b in blocks)


def _reference_healing(model, windows, removal, ridge, sequential):
    """The sequential fit as first specified, on activations held for every window: each later run is
    fitted on the whole pruned model, healed so far, run again from the embedding."""
    maps = {}
    outputs, dense = _dense(model, windows)
    blocks = removed_blocks(removal)
    for first, last in runs(blocks):
        if first == 0:
            continue
        block, target = first - 1, last + 1
        earlier = [b for b in blocks if b < first]
        if sequential and earlier:
            with healed(model, Healing(dict(maps))):
                m, out = _pruned(model, windows, _of_blocks([*earlier, *range(first, last + 1)]), block)
        else:
            m, out = outputs[block], dense[block + 1]
        y = dense[target] - out
        gram = m.T @ m
        lam = ridge * gram.diagonal().mean()
        maps[block] = torch.linalg.solve(gram + lam * torch.eye(32, dtype=torch.float64), m.T @ y)
    return maps


@pytest.mark.parametrize("family", FOLDABLE)
@pytest.mark.parametrize("blocks", [False, True], ids=["layers", "blocks"])
def test_streamed_sums_equal_the_sums_over_held_activations(family, blocks):
    model = tiny_model(family, layers=6).double()
    windows = torch.randint(3, VOCAB, (7, 24))  # 7 windows in batches of 3: a short last batch
    pairs = all_pairs(6, 3 if not blocks else 1, blocks)
    assert blocks == any(p % 2 == 0 or b % 2 for p, b in pairs)  # whole layers: MLP outputs, layer boundaries
    stats = collect_fit_stats(model, windows, None, 3, pairs, keep_states=False, blocks=blocks)
    outputs, dense = _dense(model, windows)
    assert stats.tokens == 7 * 23 and stats.states is None
    assert set(stats.cross) == pairs and set(stats.gram) == {p for p, _ in pairs}
    for (p, b), cross in stats.cross.items():
        m = outputs[p]
        assert torch.allclose(stats.gram[p], m.T @ m, rtol=1e-10, atol=1e-10)
        assert torch.allclose(cross, m.T @ (dense[b] - dense[p + 1]), rtol=1e-10, atol=1e-10)
        assert cross.shape == (32, 32)  # O(d²) per pair, whatever the number of tokens


LAYER_SETS = [Removal.of(r) for r in ([2, 3, 5, 7], [1, 4, 5], [0, 2, 5], [2, 3, 5], [2, 3, 5, 6])]
BLOCK_SETS = [
    Removal.of(attention=[2], mlp=[4]),  # two lone blocks: a run after an MLP, one after an attention block
    Removal.of([5], attention=[2, 6], mlp=[3]),  # runs from mid-layer into a whole layer and on
    Removal.of(attention=[2], mlp=[1]),  # one run of two blocks across a layer boundary, ending mid-layer
    Removal.of([3], attention=[0], mlp=[7]),  # unhealed from block 0; a run ending at the stack's output
]


@pytest.mark.parametrize("family", FOLDABLE)
@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "parallel"])
def test_streamed_progressive_fit_equals_the_fit_on_held_activations(family, sequential):
    """Runs fitted progressively from streamed sums and states on disk give the maps of the held-activation
    fit, to float64 rounding: whole-layer sets from whole-layer statistics, block sets from block ones."""
    model = tiny_model(family, layers=8).double()
    windows = torch.randint(3, VOCAB, (7, 24))
    for blocks, sets in ((False, LAYER_SETS), (True, BLOCK_SETS)):
        # Sums for no run up front: each is taken when a fit needs it, from the states on disk (as a study
        # does) or, without them, from another pass of the model.
        stats = collect_fit_stats(model, windows, None, 3, set(), sequential, blocks)
        try:
            # [2, 3, 5] and [2, 3, 5, 6] continue from the capture [2, 3, 5, 7] left at layer 4 (another target)
            for removal in sets:
                healing = fit_healing(model, stats, removal, ridge=1e-3, sequential=sequential)
                expected = _reference_healing(model, windows, removal, 1e-3, sequential)
                assert set(healing.maps) == set(expected)
                for block, delta in expected.items():
                    # The solve amplifies float64 rounding by its conditioning: up to 5e-9 of the largest
                    # entry on an AMD EPYC without AVX512 (BLAS sums in another order); a wrong fit is off by far more.
                    scale = delta.abs().max().item()
                    assert torch.allclose(healing.maps[block], delta, rtol=1e-6, atol=1e-7 * scale)
            if sequential and not blocks:
                assert len(stats.captures) == 5  # one per distinct (runs before, block): the last two sets ran nothing
        finally:
            stats.close()
        if sequential:
            assert len(stats.captures) == 0 and stats.states.closed  # closed: the scratch files are gone


def test_block_statistics_heal_whole_layers_as_layer_statistics_do():
    """A sub-layer study heals its whole-layer sets with the maps a whole-layer study fits."""
    model = tiny_model("qwen2", layers=6).double()
    windows = torch.randint(3, VOCAB, (4, 20))
    layers, blocks = (collect_fit_stats(model, windows, None, 4, all_pairs(6, 2, b), True, b) for b in (False, True))
    try:
        for removal in (Removal.of([2]), Removal.of([1, 3, 4])):
            by_layers, by_blocks = fit_healing(model, layers, removal), fit_healing(model, blocks, removal)
            assert set(by_layers.maps) == set(by_blocks.maps) == {b - 1 for b, _ in runs(removed_blocks(removal))}
            assert all(torch.allclose(by_layers.maps[k], by_blocks.maps[k], rtol=1e-9) for k in by_layers.maps)
        with pytest.raises(ValueError, match="collect_fit_stats\\(blocks=True\\)"):
            fit_healing(model, layers, Removal.of(attention=[2]))  # its run starts mid-layer
    finally:
        layers.close()
        blocks.close()


@pytest.mark.parametrize("keep_states", [True, False], ids=["from-states", "from-a-pass"])
def test_a_run_longer_than_the_summed_ones_is_summed_on_demand(keep_states):
    model = tiny_model("llama", layers=6)
    windows = torch.randint(3, VOCAB, (4, 20))
    stats = collect_fit_stats(model, windows, None, 4, all_pairs(6, 1), keep_states=keep_states)
    try:
        # A run of 3 with sums for runs of 1 only.
        healing = fit_healing(model, stats, Removal.of([1, 2, 3]), sequential=keep_states)
        full = collect_fit_stats(model, windows, None, 4, all_pairs(6, 3), keep_states=False)
        assert torch.allclose(healing.maps[1], solve(full.gram[1], full.cross[(1, 8)], DEFAULT_RIDGE))
    finally:
        stats.close()


@pytest.mark.parametrize("family", FOLDABLE)
@pytest.mark.parametrize("blocks", [False, True], ids=["layers", "blocks"])
def test_sums_from_the_states_on_disk_are_the_sums_of_the_pass(family, blocks):
    """What a study fits from (each run's sums read back from the fitting states when first needed) is
    what summing every run during the pass gave: the same operands, multiplied the same way."""
    model = tiny_model(family, layers=6)
    windows = torch.randint(3, VOCAB, (7, 24))
    pairs = all_pairs(6, 2, blocks)
    summed = collect_fit_stats(model, windows, None, 3, pairs, keep_states=True, blocks=blocks)
    lazy = collect_fit_stats(model, windows, None, 3, set(), keep_states=True, blocks=blocks)
    try:
        assert not lazy.cross and not lazy.gram
        add_pairs(model, lazy, pairs)
        assert set(lazy.cross) == pairs and set(lazy.gram) == set(summed.gram)
        for key, cross in summed.cross.items():
            assert torch.allclose(lazy.cross[key], cross, rtol=1e-6, atol=1e-9 * cross.abs().max().item()), key
        for p, gram in summed.gram.items():
            assert torch.allclose(lazy.gram[p], gram, rtol=1e-6, atol=1e-9 * gram.abs().max().item()), p
    finally:
        summed.close()
        lazy.close()


@pytest.mark.parametrize("blocks", [False, True], ids=["layers", "blocks"])
def test_sums_from_bf16_states_are_the_sums_of_the_pass_to_bf16_rounding(blocks):
    """Under bf16-mixed the streams are stored in bf16, so a run's target is summed from the block outputs
    between (stored exactly as computed), not taken as a difference of two rounded streams: the sums
    match the pass's to the rounding of its own bf16 products (a difference of stored streams misses a
    short run's target by several per cent of it)."""
    model = tiny_model("llama", layers=8)
    apply_numerics(model, "bf16-mixed")
    windows = torch.randint(3, VOCAB, (8, 32))
    pairs = all_pairs(8, 1, blocks)
    summed = collect_fit_stats(model, windows, None, 4, pairs, keep_states=True, blocks=blocks)
    lazy = collect_fit_stats(model, windows, None, 4, set(), keep_states=True, blocks=blocks)
    try:
        assert lazy.narrow
        add_pairs(model, lazy, pairs)
        assert all(torch.equal(lazy.gram[p], gram) for p, gram in summed.gram.items())
        for key, cross in summed.cross.items():
            assert (lazy.cross[key] - cross).norm() < 2**-8 * cross.norm(), key
    finally:
        summed.close()
        lazy.close()


def test_the_sums_kept_between_fits_stay_under_their_bound(monkeypatch):
    """Sums past SUMS_BYTES go, least recently used first, and a fit that needs one again sums it again."""
    model = tiny_model("llama", layers=6).double()
    windows = torch.randint(3, VOCAB, (4, 20))
    one = 32 * 32 * 8  # a d x d float64 sum
    monkeypatch.setattr(evaluators.healing, "SUMS_BYTES", 4 * one)
    stats = collect_fit_stats(model, windows, None, 4, set(), keep_states=True, blocks=True)
    try:
        # Two runs each (two d x d sums a run: its cross and its gram): room for one set's sums.
        sets = [Removal.of(attention=[a], mlp=[m]) for a, m in ((1, 3), (2, 4), (3, 5), (1, 3))]
        first = fit_healing(model, stats, sets[0], sequential=False)
        for removal in sets[1:]:
            assert not run_pairs(removal) & set(stats.cross)
            healing = fit_healing(model, stats, removal, sequential=False)
            held = sum(t.numel() * t.element_size() for t in [*stats.gram.values(), *stats.cross.values()])
            assert held <= 4 * one and set(stats.cross) == run_pairs(removal)
        assert all(torch.equal(healing.maps[k], first.maps[k]) for k in first.maps)  # summed again, the same
    finally:
        stats.close()


@pytest.mark.parametrize("dtype", ["float64", "bf16-mixed"])
def test_the_captures_sums_count_towards_the_bound_and_are_summed_again_the_same(monkeypatch, dtype):
    """Sequential fits of later runs keep a capture's MᵀM and MᵀY under SUMS_BYTES as well: dropped after
    the fit, and summed again from the capture's files to the same bits when a fit reuses the capture
    (under bf16-mixed too: the files hold the block outputs as computed)."""
    model = tiny_model("llama", layers=8)
    if dtype == "float64":
        model = model.double()
    else:
        apply_numerics(model, dtype)
    windows = torch.randint(3, VOCAB, (7, 24))
    sets = [*LAYER_SETS, *BLOCK_SETS, *LAYER_SETS]  # the second round reuses every capture of the first
    stats = collect_fit_stats(model, windows, None, 3, set(), True, True)
    try:
        expected = [fit_healing(model, stats, removal).maps for removal in sets]
        assert any(capture.sums() for capture in stats.captures.values())
    finally:
        stats.close()
    monkeypatch.setattr(evaluators.healing, "SUMS_BYTES", 0)
    stats = collect_fit_stats(model, windows, None, 3, set(), True, True)
    try:
        for removal, maps in zip(sets, expected):
            healing = fit_healing(model, stats, removal)
            assert healing.maps.keys() == maps.keys()
            assert all(torch.equal(healing.maps[k], v) for k, v in maps.items())
            assert not stats.gram and not stats.cross
            assert not any(capture.sums() for capture in stats.captures.values())
        assert stats.captures  # kept on disk: only their sums went
    finally:
        stats.close()


def test_a_run_from_block_0_is_left_unhealed_and_reported():
    model = tiny_model("llama", layers=6)
    stats = collect_fit_stats(model, torch.randint(3, VOCAB, (4, 20)), None, 4, all_pairs(6, 2, True), blocks=True)
    healing = fit_healing(model, stats, Removal.of([0, 1, 4]))
    assert healing.unhealed == ((0, 1),) == unreachable_runs(Removal.of([0, 1, 4])) and set(healing.maps) == {7}
    healing = fit_healing(model, stats, Removal.of(attention=[0, 3]))  # layer 0's attention: nothing before it
    assert healing.unhealed == ((0, 0),) == unreachable_runs(Removal.of(attention=[0])) and set(healing.maps) == {5}
    assert unreachable_runs(Removal.of(mlp=[0])) == ()  # layer 0's attention precedes it
    stats.close()


@pytest.mark.parametrize("family", FOLDABLE)
def test_healed_perplexity_from_the_prefix_cache_is_the_plain_forward_pass(family):
    model = tiny_model(family, layers=6)
    fit_windows, windows = torch.randint(3, VOCAB, (8, 32)), torch.randint(3, VOCAB, (5, 24))
    stats = collect_fit_stats(model, fit_windows, 1, 4, all_pairs(6, 2, True), blocks=True)
    cache = build_prefix_cache(model, windows, 1, batch_size=2)
    sets = (Removal.of([3]), Removal.of([1, 2, 5]), Removal.of(attention=[2], mlp=[4]), Removal.of([4], mlp=[2]))
    for removal in sets:
        healing = fit_healing(model, stats, removal)
        with healed(model, healing):
            cached = math.exp(sum(n for n, _ in cache.nll_batches(removal, healing.first_changed)) / (5 * 24))
            with removal_applied(model, removal):
                plain = perplexity(model, windows, 1, 2)
        assert math.isclose(cached, plain, rel_tol=1e-5), removal
        # Not starting before the healed layer would miss the change: the cache would answer unhealed.
        with removal_applied(model, removal):
            unhealed = perplexity(model, windows, 1, 2)
        assert not math.isclose(plain, unhealed, rel_tol=1e-6)
    stats.close()
    assert len(decoder_layers(model)) == 6


@pytest.mark.parametrize("block", [3, 2], ids=["mlp", "attention"])
def test_fold_permanently_leaves_the_healed_weights(block):
    model = tiny_model("llama", layers=4)
    delta = torch.randn(32, 32, dtype=torch.float64) * 0.1
    inputs = torch.randint(3, VOCAB, (1, 10))
    with torch.no_grad(), healed(model, Healing({block: delta})):
        expected = model(input_ids=inputs).logits
    fold_permanently(model, Healing({block: delta}))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=inputs).logits, expected)


def test_a_capture_is_reused_only_for_the_same_ridge():
    model = tiny_model("llama", layers=6).double()
    windows = torch.randint(3, VOCAB, (4, 20))
    stats = collect_fit_stats(model, windows, None, 4, all_pairs(6, 2))
    try:
        for ridge in (1e-3, 1e-1, 1e-3):  # the earlier run's map, and so the state after it, differs by ridge
            healing = fit_healing(model, stats, Removal.of([1, 3, 4]), ridge=ridge)
            expected = _reference_healing(model, windows, Removal.of([1, 3, 4]), ridge, True)
            assert all(torch.allclose(healing.maps[k], v, rtol=1e-7, atol=1e-12) for k, v in expected.items())
        assert len(stats.captures) == 2
    finally:
        stats.close()
