"""--device-map: the placement logic, and a dispatched model (accelerate's hooks) measuring what one device does.

Without GPUs the devices are `cpu` placements: the hooks and every cross-device move run, the
arithmetic is one machine's, so the figures must agree to float rounding."""

import math
from dataclasses import replace

import pytest
import torch

from evaluators.healing import all_pairs, collect_fit_stats, fit_healing, healed
from evaluators.perplexity import perplexity
from evaluators.prefix import build_prefix_cache
from search.errors import SearchError
from search.model.placement import device_map, devices_of, dispatch, layer_device, parse_device_map, split_layers
from search.model.removal import Removal
from search.model.surgery import decoder_layers, removal_applied
from tests.conftest import FAMILIES, VOCAB, tiny_model


def test_layers_split_in_contiguous_even_runs():
    assert split_layers(6, ["a", "b"]) == ["a"] * 3 + ["b"] * 3
    assert split_layers(7, ["a", "b", "c"]) == ["a", "a", "a", "b", "b", "c", "c"]
    with pytest.raises(SearchError, match="3 devices for 2 decoder layers"):
        split_layers(2, ["a", "b", "c"])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_map_covers_every_weight_with_the_embedding_first_and_the_head_last(family):
    model = tiny_model(family, layers=4)
    mapping = device_map(model, ["cuda:0", "cuda:1"])  # names only: nothing is moved
    owner = {}
    for name, _ in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        keys = [k for k in mapping if name.startswith(k + ".")]
        assert len(keys) == 1, f"{name} is covered by {keys}"
        owner[name] = mapping[keys[0]]
    layers = [mapping[k] for k in mapping if k.count(".") and k.rsplit(".", 1)[1].isdigit()]
    assert layers == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    embedding_name = next(n for n, p in model.named_parameters() if p is embedding)
    assert owner[embedding_name] == "cuda:0"
    head_name = next(n for n, p in model.named_parameters(remove_duplicate=False) if p is head and "head" in n)
    assert owner[head_name] == ("cuda:0" if head is embedding else "cuda:1")  # tied: with the embedding


def test_a_bad_map_is_refused_in_one_line():
    with pytest.raises(SearchError, match="names no device"):
        parse_device_map(" , ")
    with pytest.raises(SearchError, match="not a torch device"):
        parse_device_map("cpu,gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(SearchError, match="this torch sees none"):
            parse_device_map("auto")
        with pytest.raises(SearchError, match="no CUDA"):
            parse_device_map("cuda:0,cuda:1")
    assert parse_device_map("cpu, cpu") == ["cpu", "cpu"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_dispatched_model_measures_what_one_device_does(family):
    windows, fit_windows = torch.randint(3, VOCAB, (6, 24)), torch.randint(3, VOCAB, (8, 32))
    plain = tiny_model(family, layers=6)
    spread = dispatch(tiny_model(family, layers=6), ["cpu", "cpu", "cpu"])
    assert all(hasattr(layer, "_hf_hook") for layer in decoder_layers(spread))
    assert devices_of(spread) == [torch.device("cpu")]
    assert math.isclose(perplexity(spread, windows, 1, 2), perplexity(plain, windows, 1, 2), rel_tol=1e-6)

    caches = [build_prefix_cache(m, windows, 1, batch_size=2) for m in (plain, spread)]
    layers = decoder_layers(spread)
    for boundary, states in caches[1].states.items():  # each entry on its own layer's device
        assert all(s.device == layer_device(layers[boundary], torch.device("cpu")) for s in states)
    for removal in (Removal.of([2]), Removal.of([1, 4]), Removal.of(attention=[3], mlp=[1])):
        one, two = (c.perplexity(removal) for c in caches)
        assert math.isclose(one, two, rel_tol=1e-6), removal
        with removal_applied(spread, removal):
            assert math.isclose(two, perplexity(spread, windows, 1, 2), rel_tol=1e-5)
    if family == "gemma3":
        return  # its norms forbid folding (evaluators/healing.py refuses it)
    stats = [collect_fit_stats(m, fit_windows, 1, 4, all_pairs(6, 2, True), blocks=True) for m in (plain, spread)]
    for removal in (Removal.of([3, 4]), Removal.of([1], mlp=[4])):
        figures = []
        for model, stat in zip((plain, spread), stats):
            with healed(model, fit_healing(model, stat, removal)), removal_applied(model, removal):
                figures.append(perplexity(model, windows, 1, 2))
        assert math.isclose(*figures, rel_tol=1e-5), removal
    for stat in stats:
        stat.close()


@pytest.mark.parametrize("heal, dtype", [("none", "float32"), ("linear", "float32"), ("none", "bf16-mixed")])
def test_a_study_over_a_device_map_finds_what_one_device_finds(
    tmp_path, tiny_model_dir, corpus, heal, dtype, monkeypatch
):
    import search.model.loading as loading
    from search.records import COMPLETE, TrialRecord
    from search.study import run
    from tests.search.test_study import tiny_config

    def greedy(name, **overrides):
        # Each its own store: a shared one would answer the second study from the first's evaluations.
        storage = f"sqlite:///{tmp_path / name}.db"
        config = tiny_config(tmp_path, tiny_model_dir, corpus, trials=4, heal=heal, heal_tokens=512, storage=storage)
        config = replace(config, dtype=dtype)
        study = run(replace(config, **overrides))
        finished = study.get_trials(states=COMPLETE)
        stages = [TrialRecord.of(t) for t in finished if "greedy" in str(t.user_attrs.get("proposed_by"))]
        return study.user_attrs["baseline"]["calib_ppl"], [(r.removal, r.ppl_ratio) for r in stages]

    placed = []
    monkeypatch.setattr(loading, "dispatch", lambda model, devices: placed.append(devices) or dispatch(model, devices))
    (base, one), (spread_base, spread) = greedy("one"), greedy("spread", device_map="cpu,cpu")
    assert placed == [["cpu", "cpu"]]  # the second study, and only it, ran dispatched
    assert len(one) >= 2 and spread_base == pytest.approx(base, rel=1e-6)
    assert [r for r, _ in spread] == [r for r, _ in one]
    assert [v for _, v in spread] == pytest.approx([v for _, v in one], rel=1e-5)


def test_an_export_over_a_device_map_writes_and_verifies_what_one_device_does(
    tmp_path, tiny_model_dir, corpus, capsys, monkeypatch
):
    """Pruning, healing folds, the sub-layer format and the reloaded model's checks (held-out perplexity,
    KV cache) on a dispatched model: the files are the one-device export's, and both verify."""
    import json

    from safetensors.torch import load_file

    import search.export
    import search.model.loading as loading
    from search.cli import main
    from search.export import export_trial
    from search.records import COMPLETE, TrialRecord
    from search.study import run
    from tests.search.test_study import tiny_config

    config = tiny_config(
        tmp_path, tiny_model_dir, corpus, granularity="sublayer", budget=0.25, trials=6, heal="linear", heal_tokens=512
    )
    study = run(config)
    measured = [t for t in study.get_trials(states=COMPLETE) if "test_ppl_ratio" in t.user_attrs]
    trial = max(measured, key=lambda t: (not TrialRecord.of(t).removal.whole_layers_only, t.values[0]))
    assert not TrialRecord.of(trial).removal.whole_layers_only  # the sub-layer format, its own modeling file

    one = export_trial(study, trial.number, tmp_path / "one")
    placed = []

    def counted(model, devices):
        placed.append(devices)
        return dispatch(model, devices)

    for module in (loading, search.export):  # the pruned model and the reloaded one
        monkeypatch.setattr(module, "dispatch", counted)
    storage = f"sqlite:///{tmp_path / 'store.db'}"
    out = tmp_path / "spread"
    argv = ["export", "--study", "tiny", "--storage", storage, "--trial", str(trial.number), "--out", str(out)]
    code = main([*argv, "--device-map", "cpu,cpu"])
    spread = json.loads(capsys.readouterr().out)
    assert code == 0 and spread["ok"] and spread["kv_cache_match"] and spread["trust_remote_code"]
    assert placed == [["cpu", "cpu"]] * 2  # the pruned model, and the reloaded one (float32: loaded once)
    assert one.ok and spread["params"] == one.params
    assert spread["measured_test_ppl"] == pytest.approx(one.measured_test_ppl, rel=1e-6)
    mine, theirs = load_file(tmp_path / "one" / "model.safetensors"), load_file(out / "model.safetensors")
    assert mine.keys() == theirs.keys()
    for name, tensor in mine.items():
        torch.testing.assert_close(theirs[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


def test_the_evaluation_cache_keys_a_stack_split_across_device_kinds_apart():
    """One device and identical devices compute alike (one key); a split across kinds rounds differently."""
    from search.caching import placement_label
    from search.evaluations import device_label

    model = tiny_model("llama")
    one = placement_label(model)
    assert one == device_label(torch.device("cpu"))
    assert placement_label(dispatch(tiny_model("llama"), ["cpu", "cpu"])) == one
    decoder_layers(model)[-1].to("meta")  # a stand-in for a second kind of device (cuda:0,cpu)
    split = placement_label(model)
    assert split.startswith(one + "+") and split != one and len(split) <= len(one) + 9
    decoder_layers(model)[-2].to("meta")
    assert placement_label(model) not in (one, split)  # which layers run where is part of the key
