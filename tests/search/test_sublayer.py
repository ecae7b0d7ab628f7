"""The sub-layer space end to end: encoding, budget, sampler moves, cached evaluation, latency shapes,
and a study on a tiny model whose trials remove attention and MLP blocks."""

import json
import math
import random
from dataclasses import replace

import optuna
import pytest
import torch

from evaluators.latency import (
    PROTOCOL,
    Latency,
    block_kinds,
    kv_cache_bytes,
    layer_kinds,
    measure_latencies,
    reachable_shapes,
    shape_key,
)
from evaluators.perplexity import perplexity
from evaluators.prefix import build_prefix_cache
from evaluators.sensitivity import block_similarity
from search import space
from search.caching import CachingEvaluator
from search.errors import SearchError
from search.evaluator import Evaluator
from search.export import expected_params, prune_trial
from search.front import fastest_front, format_csv, front_report
from search.methods import choose, measure
from search.model.architectures import architecture_of
from search.model.numerics import apply_numerics
from search.model.removal import Removal
from search.model.sublayer_export import skipped_blocks
from search.model.surgery import (
    block_param_counts,
    decoder_layers,
    layer_param_counts,
    removal_applied,
    total_param_count,
)
from search.records import (
    COMPLETE,
    LatencyEntry,
    StudyRecord,
    TrialRecord,
    calib_ppl_ratio,
    needs_retiming,
    read_latency,
    read_retiming,
    write_retiming,
)
from search.sampler import RemovalSetSampler, removal_set
from search.seeding.greedy import Stage, seed_sets, staged_greedy
from search.seeding.seed import LayerSeeds, Seeding, attention_drop_seeds, layer_seeds, sublayer_seeds
from search.space import Budget
from search.study import RunConfig, prepare, run
from search.summary import trial_details
from tests.conftest import FAMILIES, VOCAB, tiny_model
from tests.search.test_study import tiny_config

# 8 layers of 100 parameters: attention 30, MLP 70; 200 elsewhere.
SUBLAYER = Budget(0.2, total_params=1000, layer_params=[100] * 8, block_params=[(30, 70)] * 8)


def test_encoding_round_trips_and_keeps_whole_layer_names():
    removal = Removal.of([1], attention=[3], mlp=[6])
    params = space.encode(removal, 8, "sublayer")
    assert params["drop_attn_01"] and params["drop_mlp_01"] and params["drop_attn_03"] and not params["drop_mlp_03"]
    assert len(params) == 16 and space.decode(params) == removal
    assert space.encode(Removal.of([2, 5]), 8) == {f"drop_{i:02d}": i in (2, 5) for i in range(8)}  # unchanged
    assert space.decode({"drop_02": True, "drop_05": True, "drop_06": False}) == Removal.of([2, 5])
    with pytest.raises(SearchError, match="single blocks"):
        space.encode(removal, 8, "layer")


def test_sublayer_budget_counts_blocks():
    assert SUBLAYER.granularity == "sublayer" and len(SUBLAYER.units()) == 16
    assert math.isclose(SUBLAYER.params_reduction(Removal.of([0], attention=[3])), 0.13)
    assert SUBLAYER.allows(Removal.of(attention=[0, 1, 2, 3, 4, 5]))  # 18 %: six attention blocks
    assert not SUBLAYER.allows(Removal.of([0, 1], attention=[2]))  # 23 %
    assert SUBLAYER.max_layers() == 2 and SUBLAYER.max_units() == 6
    whole = Budget(0.2, total_params=1000, layer_params=[100] * 8)
    assert not whole.allows(Removal.of(attention=[0]))  # a block is not in a whole-layer space


def test_sampler_proposes_new_feasible_block_sets():
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=RemovalSetSampler(SUBLAYER, seed=0))
    for removal in (Removal.of([2]), Removal.of(attention=[4, 5])):
        study.enqueue_trial(space.encode(removal, 8, "sublayer"))

    def objective(trial):
        removal = space.suggest(trial, SUBLAYER)
        assert SUBLAYER.allows(removal)
        return SUBLAYER.params_reduction(removal) * -1 + len(removal.attention) * 0.01, 1.0

    study.optimize(objective, n_trials=40)
    sets = [removal_set(t) for t in study.trials]
    assert len(set(sets)) == len(sets)  # never a repeat
    assert any(s.attention or s.mlp for s in sets[2:]) and any(s.layers for s in sets[2:])


def test_block_greedy_walks_blocks_and_joins_a_layer():
    # Attention of layer 5 is cheapest, then the MLP of layer 5: two stages make layer 5 a whole removal.
    cost = {Removal.of(attention=[5]): 1.0, Removal.of(mlp=[5]): 1.1}

    def score(removed, candidates):
        return {u: cost.get(u, 2.0 + 0.01 * u.changed_layers[0]) for u in candidates}

    stages = staged_greedy(score, SUBLAYER, max_stages=3)
    assert [s.removed for s in stages] == [
        Removal.of(attention=[5]),
        Removal.of([5]),
        Removal.of([5], attention=[0]),
    ]
    seeds = dict(seed_sets(stages, SUBLAYER, count=20))
    assert seeds[Removal.of([5])] == "greedy stage 2"
    assert seeds[Removal.of(mlp=[5], attention=[0])] == "greedy stage 3 less a5"  # one block short
    assert all(SUBLAYER.allows(s) for s in seeds)


def test_a_sublayer_study_also_starts_from_the_whole_layer_path():
    def score(removed, candidates):  # layers 6 then 2 are the cheapest whole layers
        return {u: {6: 1.0, 2: 1.1}.get(u.layers[0], 2.0) for u in candidates}

    picks = [(Removal.of([0, 1]), "block influence top 2")]
    found, stages = layer_seeds(score, SUBLAYER, picks)
    assert [s.removed for s in stages] == [Removal.of([6]), Removal.of([2, 6])]
    assert found.path == [(Removal.of([6]), "layer greedy stage 1"), (Removal.of([2, 6]), "layer greedy stage 2")]
    # The rest of what a whole-layer study seeds, in its order: the one-pass picks before the sets one short.
    assert found.rest[:2] == [
        (Removal.of([0, 1]), "layer block influence top 2"),
        (Removal.of([2]), "layer greedy stage 2 less 6"),
    ]
    seeds = dict(found.path + found.rest)
    assert all(s.whole_layers_only and SUBLAYER.allows(s) for s in seeds)
    similar = {Removal.of(attention=[i]): 1.0 - i / 10 for i in range(8)} | {Removal.of(mlp=[0]): 0.0}
    drops = attention_drop_seeds(similar, SUBLAYER)
    assert [r for r, _ in drops] == [Removal.of(attention=range(7, 7 - k, -1)) for k in range(1, 7)]  # to 18 %


def plain(model, removal, windows, bos_id, batch_size):
    with removal_applied(model, removal):
        return perplexity(model, windows, bos_id, batch_size)


@pytest.mark.parametrize("dtype", ["float32", "bf16-mixed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_sublayer_evaluation_equals_a_full_pass(family, dtype):
    model = apply_numerics(tiny_model(family, layers=6), dtype)
    tolerance = 1e-5 if dtype == "float32" else 1e-3  # bf16 products round the two paths' batches alike, not exactly
    windows = torch.randint(3, VOCAB, (5, 16))
    cache = build_prefix_cache(model, windows, 1, batch_size=2)
    rng = random.Random(0)
    removals = [Removal.of(mlp=[5]), Removal.of(attention=[0]), Removal.of([2], attention=[3], mlp=[4])]
    while len(removals) < 8:
        blocks = rng.sample([(i, k) for i in range(6) for k in ("attn", "mlp")], rng.randint(1, 6))
        removals.append(Removal.from_blocks(blocks))
    for removal in removals:
        expected = plain(model, removal, windows, 1, 2)
        assert math.isclose(cache.perplexity(removal), expected, rel_tol=tolerance), removal
    base = Removal.of(attention=[1])  # a cache taken on a model already without a block (block greedy)
    pruned = build_prefix_cache(model, windows, 1, batch_size=2, base=base)
    removal = base | Removal.of(mlp=[3])
    assert math.isclose(pruned.perplexity(removal), plain(model, removal, windows, 1, 2), rel_tol=tolerance)
    assert pruned.start(removal) == 3  # starts at the newly changed layer
    assert len(decoder_layers(model)) == 6 and math.isclose(cache.perplexity(Removal()), cache.base_ppl)


def test_block_shapes_and_their_latency():
    model = tiny_model("gemma3", layers=4)  # sliding and full attention layers: two attention kinds
    kinds, blocks = layer_kinds(model), block_kinds(model)
    assert [a + m for a, m in block_param_counts(model)] == layer_param_counts(model)
    # Same kept blocks and layers, same key.
    assert shape_key(kinds, Removal.of(attention=[0]), blocks) == shape_key(kinds, Removal.of(attention=[2]), blocks)
    assert shape_key(kinds, Removal.of(attention=[0]), blocks) != shape_key(kinds, Removal.of(attention=[1]), blocks)
    assert shape_key(kinds, Removal.of(attention=[1], mlp=[3]), blocks) == shape_key(
        kinds, Removal.of(attention=[3], mlp=[1]), blocks
    )
    # A whole layer against the same blocks from two layers: one layer call fewer, so another shape.
    assert shape_key(kinds, Removal.of([1]), blocks) != shape_key(kinds, Removal.of(attention=[1], mlp=[3]), blocks)
    assert (
        shape_key(kinds, Removal.of([1]))
        == shape_key(kinds, Removal.of([3]))
        == "9360/full_attention*1 9360/sliding_attention*2"
    )
    with pytest.raises(ValueError, match="block kinds"):
        shape_key(kinds, Removal.of(attention=[1]))
    budget = Budget(0.2, total_params=sum(layer_param_counts(model)) * 2, layer_params=layer_param_counts(model))
    sub = Budget(budget.fraction, budget.total_params, budget.layer_params, block_param_counts(model))
    reachable = reachable_shapes(kinds, sub.allows, 64, blocks)
    assert reachable and all(sub.allows(r) for r in reachable.values())
    assert any(not r.whole_layers_only for r in reachable.values())
    ids = torch.randint(3, VOCAB, (1, 16))
    timed = measure_latencies(
        model, list(reachable.values()), ids, warmup=1, repeats=3, layer_kinds=kinds, blocks=blocks
    )
    assert len(timed) == len(reachable) and all(t.candidate_ms > 0 for t in timed)


def test_a_sublayer_study_searches_blocks(tmp_path, tiny_model_dir, corpus):
    config = tiny_config(tmp_path, tiny_model_dir, corpus, granularity="sublayer", budget=0.25, trials=10)
    study = run(config)
    done = study.get_trials(states=COMPLETE)
    assert len(done) >= 10
    assert all(set(t.params) == {f"drop_{k}_{i:02d}" for i in range(6) for k in ("attn", "mlp")} for t in done)
    removals = [TrialRecord.of(t).removal for t in done]
    assert removals == [removal_set(t) for t in done]  # what was recorded is what the parameters say
    assert any(r.attention or r.mlp for r in removals)
    reasons = {TrialRecord.of(t).proposed_by for t in study.trials}
    assert {"greedy stage 1", "attention drop top 1"} <= reasons  # block greedy, LLM-Drop's pick
    report = front_report(study)
    assert report["granularity"] == "sublayer"
    for point in report["front"]:
        assert set(point) >= {"removed_layers", "removed_attention", "removed_mlp"}
        assert point["layers"] == 6 - len(point["removed_layers"])
        assert 0 < point["kv_cache_ratio"] <= 1
    assert format_csv(report).startswith("trial,removed_layers,removed_attention,removed_mlp,layers")
    # The best set of each parameter reduction carries a held-out figure, whether or not a faster one dominates it.
    measured = [t for t in done if TrialRecord.of(t).duplicate_of is None]
    shown = {Removal.from_json(p).key for p in report["front"]}
    retimed = fastest_front(study, read_retiming(study))  # the figures the run ended by timing side by side
    assert {TrialRecord.of(t).removal.key for t in retimed} <= shown
    for t in measured:
        reduction = TrialRecord.of(t).params_reduction
        beaten = [o for o in measured if o.values[0] < t.values[0] and TrialRecord.of(o).params_reduction >= reduction]
        if not beaten:  # and the front shows it, beside the (perplexity, latency) front
            assert TrialRecord.of(t).test_ppl_ratio is not None, t.number
            assert TrialRecord.of(t).removal.key in shown, t.number
    # A set stopped early was proven worse than one at least as fast and than one at least as small.
    for stopped in [t for t in study.trials if TrialRecord.of(t).rejected]:
        record = TrialRecord.of(stopped)
        assert any(
            o.values[0] < record.ppl_ratio_lower_bound and TrialRecord.of(o).params_reduction >= record.params_reduction
            for o in done
        ), stopped.number
    # Each recorded ratio is what the pruned model measures from scratch (blocks skipped, not zeroed).
    _, evaluator, _ = prepare(config)
    evaluator.baseline()
    blocky = next(t for t in done if TrialRecord.of(t).removal.attention or TrialRecord.of(t).removal.mlp)
    assert math.isclose(evaluator.calib_ratio(TrialRecord.of(blocky).removal), blocky.values[0], rel_tol=1e-6)
    # Export, heal and evaluate build a point this way: the same blocks skipped for good, the same size.
    pruned = prune_trial(study, blocky.number)
    removal = TrialRecord.of(blocky).removal
    kept = [i for i in range(6) if i not in removal.layers]
    assert skipped_blocks(pruned.model) == removal.remap({old: new for new, old in enumerate(kept)})
    assert total_param_count(pruned.model) == expected_params(StudyRecord.read(study), blocky)
    again = run(config)  # a resume reads the study back
    assert len(again.get_trials(states=COMPLETE)) == len(done)


@pytest.mark.parametrize("dtype", ["float32", "bf16-mixed"])
def test_a_healed_sublayer_study_exports_its_folded_maps_and_verifies(
    tmp_path, tiny_model_dir, corpus, monkeypatch, dtype
):
    """--heal linear over block runs: the study's healed held-out figure is what the exported model, its
    maps folded into attention and MLP output projections and reloaded with its modeling file, measures."""
    import search.seeding.seed
    from search.export import export_trial

    paths = []  # the greedy paths scored healed: how many stages each may take
    real = search.seeding.seed.healed_scores
    monkeypatch.setattr(
        search.seeding.seed, "healed_scores", lambda ev, most, units: paths.append(most) or real(ev, most, units)
    )
    config = tiny_config(
        tmp_path,
        tiny_model_dir,
        corpus,
        granularity="sublayer",
        budget=0.25,
        trials=8,
        heal="linear",
        heal_tokens=512,
        dtype=dtype,
    )
    study = run(config)
    _, _, budget = prepare(config)
    assert sorted(paths) == sorted([budget.max_units(), budget.max_layers()])  # the block path and the layer path
    measured = [t for t in study.get_trials(states=COMPLETE) if "test_ppl_ratio" in t.user_attrs]
    trial = max(measured, key=lambda t: (not TrialRecord.of(t).removal.whole_layers_only, t.values[0]))
    removal = TrialRecord.of(trial).removal
    assert not removal.whole_layers_only
    _, evaluator, _ = prepare(config)
    evaluator.baseline()
    healed_ratio = evaluator.calib_ratio(removal)
    unhealed = evaluator.ppl(removal, "calib", unhealed=True) / evaluator.base_ppl["calib"]
    assert math.isclose(healed_ratio, calib_ppl_ratio(trial), rel_tol=1e-6) and healed_ratio != unhealed
    report = export_trial(study, trial.number, tmp_path / "out")
    assert report.ok and report.trust_remote_code and report.ppl_rel_diff <= 0.01
    healing = json.loads((tmp_path / "out" / "pruning.json").read_text())["healing"]
    assert healing["method"] == "linear" and healing["folded_into"]

    # It starts from the path a healed whole-layer study walks (scored healed, not unhealed).
    layer_study = run(replace(config, granularity="layer", study="layers", trials=1))
    path = [stage.removed for stage in StudyRecord.read(layer_study).greedy]
    reasons = {TrialRecord.of(t).removal: TrialRecord.of(t).proposed_by for t in study.trials}
    assert path and all(reasons[removal] == f"layer greedy stage {n}" for n, removal in enumerate(path, 1))


def test_sublayer_studies_get_their_own_default_name():
    layer, sublayer = RunConfig(budget=0.12), RunConfig(budget=0.12, granularity="sublayer")
    assert sublayer.study_name == layer.study_name + "-sublayer"


def test_sublayer_refusals_are_one_line(tmp_path, tiny_model_dir, corpus):
    for overrides, message in (
        ({"criterion": "bi"}, "ranks whole layers only"),
        ({"granularity": "blocks"}, "choose one of layer, sublayer"),
    ):
        config = tiny_config(tmp_path, tiny_model_dir, corpus, **{"granularity": "sublayer", **overrides})
        with pytest.raises(SearchError, match=message):
            run(config)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_similarity_scores_every_block_and_finds_a_silent_one(family):
    model = tiny_model(family, layers=4)
    arch = architecture_of(model)
    with torch.no_grad():  # layer 2's attention adds nothing: its output equals its input
        attention = decoder_layers(model)[2].get_submodule(arch.attention_module)
        for parameter in attention.parameters():
            parameter.zero_()
    scores = block_similarity(model, torch.randint(3, VOCAB, (3, 12)), 1, batch_size=2)
    assert set(scores) == {Removal.from_blocks([(i, k)]) for i in range(4) for k in ("attn", "mlp")}
    assert scores[Removal.of(attention=[2])] == pytest.approx(0.0, abs=1e-6)
    assert min(v for u, v in scores.items() if u != Removal.of(attention=[2])) > 1e-4


def test_block_methods_choose_blocks(tmp_path, tiny_model_dir, corpus):
    config = tiny_config(tmp_path, tiny_model_dir, corpus, granularity="sublayer")
    _, evaluator, _ = prepare(config)
    cached = CachingEvaluator(evaluator)
    cached.baseline()
    drop = choose(cached, "attention_drop", 3, config.sensitivity_tokens)
    assert len(drop.sets[0].without_attention) == 3 and not drop.sets[0].without_mlp
    greedy = choose(cached, "block_greedy", 3, config.sensitivity_tokens)
    assert len(greedy.sets[0].blocks()) == 3
    (row,) = measure(cached, [greedy])
    assert set(row) >= {"removed_layers", "removed_attention", "removed_mlp", "calib_ppl_ratio", "latency_ratio"}
    with pytest.raises(SearchError, match="counts blocks"):
        choose(cached, "attention_drop", 7, config.sensitivity_tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_shrinks_with_the_attention_blocks_removed(family):
    model = tiny_model(family, layers=6)
    ids = torch.randint(3, VOCAB, (1, 12))
    base = kv_cache_bytes(model, ids)
    assert base > 0
    whole = kv_cache_bytes(model, ids, Removal.of([1]))
    if "sliding_attention" not in (getattr(model.config, "layer_types", None) or []):
        assert whole / base == pytest.approx(5 / 6)  # else sliding layers hold less: measured, not counted
    assert kv_cache_bytes(model, ids, Removal.of(mlp=[1, 2])) == base  # MLP blocks hold no cache
    placeholder = kv_cache_bytes(model, ids, Removal.of(attention=[1])) - whole
    assert 0 < placeholder <= 2 * 12 * 4  # what is left of a skipped slot: one element per token, keys and values


def test_tpe_searches_the_sublayer_space_too(tmp_path, tiny_model_dir, corpus):
    config = tiny_config(tmp_path, tiny_model_dir, corpus, granularity="sublayer", sampler="tpe", trials=12)
    study = run(config)
    sampled = [t for t in study.get_trials(states=COMPLETE) if TrialRecord.of(t).proposed_by == "sampler"]
    assert sampled and all(len(t.params) == 12 for t in sampled)


def test_sublayer_seeds_come_in_order_and_leave_half_the_trials_to_the_sampler():
    stages = [
        Stage(Removal.of(attention=[5]), 1.0, {}),
        Stage(Removal.of(attention=[5, 6]), 1.0, {}),
        Stage(Removal.of(attention=[4, 5, 6]), 1.0, {}),
    ]
    layer = LayerSeeds(
        path=[(Removal.of([6]), "layer greedy stage 1"), (Removal.of([6, 7]), "layer greedy stage 2")],
        rest=[(Removal.of([5]), "layer neighbour of greedy stage 1"), (Removal.of([3]), "layer greedy stage 2 less 6")],
    )
    others = [(Removal.of(attention=[1]), "attention drop top 1"), (Removal.of([0, 1, 2]), "far over budget")]
    seeding = Seeding(stages, others, passes=0, layer=layer)
    seeds = sublayer_seeds(seeding, SUBLAYER, limit=6)
    # The whole-layer path, then the block path, before anything around them: at 25 % the
    # whole-layer path and its neighbours alone once filled the limit and the block path was never seeded.
    assert [reason for _, reason in seeds] == [
        "layer greedy stage 1",
        "layer greedy stage 2",
        "greedy stage 1",
        "greedy stage 2",
        "greedy stage 3",
        "layer neighbour of greedy stage 1",
    ]
    # + the rest of the layer seeds, attention drop and the last stage less a5 or a6 (less a4: stage 2)
    assert len(sublayer_seeds(seeding, SUBLAYER, limit=40)) == 10
    # Never fewer than both paths: cut to half of the trials at 25 %, block greedy lost its largest sets.
    assert [reason for _, reason in sublayer_seeds(seeding, SUBLAYER, limit=1)] == [
        "layer greedy stage 1",
        "layer greedy stage 2",
        "greedy stage 1",
        "greedy stage 2",
        "greedy stage 3",
    ]


def _cost(removal: Removal) -> float:
    """A deterministic stand-in for a tiny model's forward time: attention 1, MLP 2, a layer call 0.5."""
    blocks = removal.blocks()
    return sum(
        ((i, "attention") not in blocks) + 2 * ((i, "mlp") not in blocks) + 0.5 * (i not in removal.layers)
        for i in range(6)
    )


def test_front_shapes_timed_one_at_a_time_are_timed_again_side_by_side(tmp_path, tiny_model_dir, corpus, monkeypatch):
    # As in a sub-layer study of a real model: too many shapes to time at seeding, so each trial times its
    # own. Timed alone a shape drifts by up to 30 % either way; side by side it is timed right.
    drift = iter([1.3, 0.7, 1.1, 0.9] * 100)
    monkeypatch.setattr(Evaluator, "reachable_shapes", lambda self, allows, limit=64: None)
    monkeypatch.setattr(Evaluator, "latency", lambda self, r=Removal(): Latency(21.0, _cost(r) * next(drift)))
    monkeypatch.setattr(Evaluator, "latencies", lambda self, rs: [Latency(21.0, _cost(r)) for r in rs])
    config = tiny_config(tmp_path, tiny_model_dir, corpus, granularity="sublayer", budget=0.25, trials=8)
    study = run(config)
    retiming = read_retiming(study)
    assert retiming is not None and retiming.rounds == config.latency_repeats
    _, evaluator, _ = prepare(config)
    report = front_report(study)
    assert report["retimed_rounds"] == config.latency_repeats
    for point in report["front"]:
        removal = Removal.from_json(point)
        entry = read_latency(study, evaluator.shape(removal))
        assert entry is not None and entry.timed == "front", point
        assert point["latency_ratio"] == entry.ratio == retiming.ratios[removal.key] == _cost(removal) / 21
    # Every trial of a retimed shape reads the shape's new figure; `show` keeps the one it ran with.
    for trial in study.get_trials(states=COMPLETE):
        removal = TrialRecord.of(trial).removal
        entry = read_latency(study, evaluator.shape(removal))
        assert entry is not None and entry.timed in ("front", "alone")
        shown = trial_details(study, trial.number)
        if entry.timed == "front":
            assert shown["latency_ratio"] == entry.ratio == retiming.ratios[removal.key]
            assert shown.get("latency_ratio_when_run", trial.values[1]) == trial.values[1]
        else:
            assert removal.key not in retiming.ratios and shown["latency_ratio"] == trial.values[1]
    assert any("latency_ratio_when_run" in trial_details(study, p["trial"]) for p in report["front"])
    # A resume with more trials times the front of then, the shapes retimed before among them, together again.
    more = run(replace(config, trials=10))
    assert {Removal.from_json(p).key for p in front_report(more)["front"]} <= set(read_retiming(more).ratios)
    assert read_retiming(more).trials == len(more.get_trials(states=COMPLETE))
    # A retiming that did not finish (or a study finished before runs retimed): the same command redoes it.
    write_retiming(more, replace(read_retiming(more), ratios={}, trials=0))
    again = run(replace(config, trials=10))
    assert read_retiming(again).trials == len(again.get_trials(states=COMPLETE)) and read_retiming(again).ratios
    # Every front point carries a held-out figure, also one the new figures brought onto the front.
    assert all(p["test_ppl_ratio"] is not None for p in front_report(again)["front"])
    # A store retimed before pairing (it records no protocol): the same command times its front again, paired.
    stored = {k: v for k, v in again.user_attrs["retimed_front"].items() if k != "protocol"}
    again.set_user_attr("retimed_front", stored)
    assert read_retiming(again).protocol == "medians" and needs_retiming(again)
    assert read_retiming(run(replace(config, trials=10))).protocol == PROTOCOL


def test_which_latency_entries_were_timed_alone():
    seeding = 12.5  # the baseline figure the seeding table recorded
    assert not LatencyEntry(0.9, 11.0, 12.5, timed="together").timed_alone(seeding)
    assert LatencyEntry(0.9, 11.0, 12.1, timed="alone").timed_alone(seeding)
    assert not LatencyEntry(0.9, 11.0, 12.1, timed="front").timed_alone(seeding)
    # Older stores say nothing: the seeding table's entries share its baseline, with or without the fit.
    assert not LatencyEntry(0.9, 11.0, 12.5).timed_alone(seeding)
    assert not LatencyEntry(0.9, 11.0, 12.5, 11.2, 12.4).timed_alone(seeding)
    assert LatencyEntry(0.9, 11.0, 12.1).timed_alone(seeding)


def test_a_study_that_timed_every_shape_at_seeding_retimes_nothing(tmp_path, tiny_model_dir, corpus):
    study = run(tiny_config(tmp_path, tiny_model_dir, corpus, trials=4))
    assert read_retiming(study) is None and "retimed_rounds" not in front_report(study)
