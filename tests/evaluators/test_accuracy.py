"""The harness wiring: the offline task and local copies of standard tasks on a tiny model, and the errors."""

import json
from pathlib import Path

import pytest

from evaluators.accuracy import harness_version, load_tasks, run_tasks, task_manager
from evaluators.cloze import cloze_task
from search.errors import SearchError
from tests.conftest import tiny_model, tiny_tokenizer

# One document per standard task in the format of its hub dataset; the task's own YAML (prompt,
# choices, metrics, process_docs) is included unchanged, only the data comes from a local file.
STANDARD = {
    "lambada_openai": ("test", {"text": "word10 word11 word12 word13 word14 word15"}),
    "arc_easy": (
        "test",
        {
            "id": "q1",
            "question": "word20 word21 word22?",
            "choices": {"text": ["word30", "word31", "word32", "word33"], "label": ["A", "B", "C", "D"]},
            "answerKey": "B",
        },
    ),
    "hellaswag": (
        "validation",
        {
            "ind": 1,
            "activity_label": "word40",
            "ctx_a": "word41 word42",
            "ctx_b": "word43",
            "ctx": "word41 word42 word43",
            "endings": ["word44", "word45", "word46", "word47"],
            "source_id": "s",
            "split": "val",
            "split_type": "indomain",
            "label": "2",
        },
    ),
    "piqa": ("validation", {"goal": "word50 word51", "sol1": "word52", "sol2": "word53", "label": 1}),
    "winogrande": (
        "validation",
        {"sentence": "word60 word61 _ word62 word63.", "option1": "word64", "option2": "word65", "answer": "2"},
    ),
    "boolq": ("validation", {"question": "word70 word71", "passage": "word72 word73 word74", "idx": 0, "label": 1}),
}


@pytest.fixture(scope="module")
def local_copies(tmp_path_factory) -> Path:
    """A folder for --include-path: `<task>_local` includes the harness's `<task>` YAML, data from JSON lines."""
    folder = tmp_path_factory.mktemp("tasks")
    manager = task_manager()
    for name, (split, doc) in STANDARD.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for _ in range(3)))
        yaml = [
            f"include: {manager.task_index[name].yaml_path}",
            f"task: {name}_local",
            "tag: []",
            "dataset_path: json",
            "dataset_name: null",
            "training_split: null",
            *(["validation_split: null"] if split == "test" else []),
            f"dataset_kwargs: {{data_files: {{{split}: {data}}}}}",
        ]
        (folder / f"{name}_local.yaml").write_text("\n".join(yaml) + "\n")
    # Two groups of local tasks: one with an aggregate score (stored under the group's name), one without.
    aggregate = "aggregate_metric_list: [{metric: acc, aggregation: mean, weight_by_size: true}]"
    (folder / "pair.yaml").write_text(f"group: local_pair\ntask: [piqa_local, boolq_local]\n{aggregate}\n")
    (folder / "bare.yaml").write_text("group: local_bare\ntask: [piqa_local, boolq_local]\n")
    return folder


@pytest.fixture(scope="module")
def manager(local_copies):
    return task_manager([local_copies])


def test_standard_task_formats_run_from_local_copies(manager):
    names = [f"{name}_local" for name in STANDARD]
    tasks = load_tasks(manager, names)
    results = run_tasks(tiny_model("llama"), tiny_tokenizer(), tasks, limit=None, batch_size=4, numerics="float32")
    assert list(results) == names
    for name, result in results.items():
        assert result.n == 3 and result.metric == "acc" and result.higher_is_better
        assert 0.0 <= result.value <= 1.0 and result.harness == harness_version()
        if name != "lambada_openai_local":  # multiple choice: acc_norm too (boolq and winogrande: acc only)
            assert ("acc_norm" in result.metrics) == (name in ("arc_easy_local", "hellaswag_local", "piqa_local"))
    assert set(results["lambada_openai_local"].metrics) == {"acc", "perplexity"}
    assert results["lambada_openai_local"].metrics["perplexity"][0] > 1.0


@pytest.mark.parametrize("numerics", ["float32", "bf16-mixed"])
def test_offline_cloze_task_results_are_parsed_with_stderr(tmp_path, numerics):
    from search.model.numerics import apply_numerics

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"w{10 + i} w{20 + i} w{30 + i} w{40 + i}"}) + "\n" for i in range(12)))
    tasks = load_tasks(task_manager(defaults=False), ["cloze"], {"cloze": cloze_task("cloze", str(data))})
    model = apply_numerics(tiny_model("gpt2"), numerics)
    result = run_tasks(model, tiny_tokenizer(), tasks, limit=10, batch_size=3, numerics=numerics)["cloze"]
    assert (result.n, result.limit, result.numerics, result.metric) == (10, 10, numerics, "acc")
    assert result.stderr is not None and result.stderr >= 0.0
    assert result.metrics["perplexity"][0] > 1.0 and result.metrics["perplexity"][1] is not None
    again = run_tasks(model, tiny_tokenizer(), tasks, limit=10, batch_size=5, numerics=numerics)["cloze"]
    assert again.metrics["perplexity"][0] == pytest.approx(result.metrics["perplexity"][0], rel=1e-3)


def test_a_group_is_scored_by_its_aggregate(manager):
    tasks = load_tasks(manager, ["local_pair"])
    result = run_tasks(tiny_model("llama"), tiny_tokenizer(), tasks, limit=None, batch_size=4, numerics="float32")
    assert list(result) == ["local_pair"] and result["local_pair"].n == 6  # three documents in each task
    assert result["local_pair"].metric == "acc" and 0.0 <= result["local_pair"].value <= 1.0


def test_groups_without_a_score_and_overlapping_names_are_refused(manager):
    with pytest.raises(SearchError, match="group 'local_bare' has no aggregate score; pass its tasks by name"):
        load_tasks(manager, ["local_bare"])
    with pytest.raises(SearchError, match="--tasks name piqa_local twice"):
        load_tasks(manager, ["piqa_local", "local_pair"])


def test_unknown_task_and_tag_are_one_line_errors(manager):
    with pytest.raises(SearchError, match=r"unknown task 'arc_esy'; did you mean arc_easy"):
        load_tasks(manager, ["arc_esy"])
    with pytest.raises(SearchError, match=r"'ai2_arc' is a tag of several tasks; pass them by name: arc_challenge"):
        load_tasks(manager, ["ai2_arc"])


def test_hub_data_missing_offline_says_how_to_get_it(manager, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        SearchError, match="task arc_easy: its data cannot be loaded here.*hub access run the same command once"
    ) as error:
        load_tasks(manager, ["arc_easy"])
    assert "\n" not in str(error.value)
