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
    "lambada_openai": ("test", {"text": "w10 w11 w12 w13 w14 w15"}),
    "arc_easy": (
        "test",
        {
            "id": "q1",
            "question": "w20 w21 w22?",
            "choices": {"text": ["w30", "w31", "w32", "w33"], "label": ["A", "B", "C", "D"]},
            "answerKey": "B",
        },
    ),
    "hellaswag": (
        "validation",
        {
            "ind": 1,
            "activity_label": "w40",
            "ctx_a": "w41 w42",
            "ctx_b": "w43",
            "ctx": "w41 w42 w43",
            "endings": ["w44", "w45", "w46", "w47"],
            "source_id": "s",
            "split": "val",
            "split_type": "indomain",
            "label": "2",
        },
    ),
    "piqa": ("validation", {"goal": "w50 w51", "sol1": "w52", "sol2": "w53", "label": 1}),
    "winogrande": ("validation", {"sentence": "w60 w61 _ w62 w63.", "option1": "w64", "option2": "w65", "answer": "2"}),
    "boolq": ("validation", {"question": "w70 w71", "passage": "w72 w73 w74", "idx": 0, "label": 1}),
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
