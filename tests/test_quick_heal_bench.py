"""The chat and zero-shot stages of benchmarks/bench_quick_heal.py and their part of benchmarks/report.py, end to
end on tiny models: a random chat Llama as the dense source, its real Basis Sharing conversion and a real (short)
healing of it in the work dir, every results path redirected into tmp_path."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys

import pytest
import torch
from conftest import DATA, REPO
from test_chat import PROMPTS, chat_model, chat_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_compress  # noqa: F401  (registers SharedBasisLlama with the Auto classes)
from hf_compress.basis_sharing import BasisSharingConfig
from hf_compress.evaluation.chat import (
    answer_nll,
    first_sentence,
    generate_chat_answers,
)
from hf_compress.evaluation.tasks import ZEROSHOT_GROUP, ZEROSHOT_SETS

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT_PROMPTS = PROMPTS[:4]  # the first makes the dense model end its turn at once
MODELS = ["dense", "student-r0.2", "healed-r0.2-262k"]


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bench = load_module("bench_quick_heal")
report = load_module("report")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random chat Llama (ChatML template) saved in float32 with its tokenizer: the dense model."""
    tokenizer = chat_tokenizer()
    path = tmp_path_factory.mktemp("chat-source")
    chat_model(tokenizer).float().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory, source, calib_file):
    """A work dir as the benchmark leaves it: the 20% student, it healed as row r0.2-262k (for a few steps), and
    what the stages must leave out: a healing state, an unfinished student and a healed model of no known row."""
    from hf_compress.basis_sharing import CalibrationConfig, convert
    from hf_compress.healing import HealConfig, heal

    work = tmp_path_factory.mktemp("quick_heal")
    convert(str(source), work / "student-r0.2", BasisSharingConfig(ratio=0.2),
            calibration=CalibrationConfig(dataset=str(calib_file), samples=8, seq_len=32), progress=False)
    heal(work / "student-r0.2", work / "healed-r0.2-262k", teacher=str(source),
         config=HealConfig(tokens=8 * 4 * 32, seq_len=32, batch_size=4, lr=3e-3, warmup_ratio=0.0,
                           dataset=str(calib_file), dtype="float32", save_steps=1000), device="cpu", progress=False)
    (work / ".healed-r0.3-262k.heal-state").mkdir()
    (work / ".healed-r0.3-262k.heal-state" / "config.json").write_text("{}")
    (work / "student-r0.3").mkdir()  # a conversion still running: no config.json yet
    shutil.copytree(work / "student-r0.2", work / "healed-unknown-row")
    return work


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, work, source):
    """The chat stage run once: its paths, the rows it returned and what it logged."""
    out = tmp_path_factory.mktemp("results")
    prompts_file = out / "chat_prompts.json"
    prompts_file.write_text(json.dumps(CHAT_PROMPTS))
    paths = {"prompts_file": prompts_file, "rows_file": out / "quick_heal_chat.jsonl",
             "answers_file": out / "quick_heal_chat_answers.json"}
    logged: list[str] = []
    rows = bench.chat_stage(work, source=str(source), max_new_tokens=10, batch_size=3, log=logged.append, **paths)
    return paths, rows, logged


def load(spec):
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(spec)


def test_models_of_the_work_dir(work, source):
    models = bench.bench_models(work, str(source))
    assert [m.name for m in models] == MODELS
    assert [(m.kind, m.ratio, m.budget_tokens) for m in models] == [("dense", 0.0, None), ("unhealed", 0.2, None),
                                                                   ("healed", 0.2, 262144)]
    assert models[0].spec == str(source) and models[2].spec == str(work / "healed-r0.2-262k")
    assert bench.bench_models(work)[0].spec == "smollm2"
    with pytest.raises(SystemExit, match="no finished checkpoint student-r0.3"):
        bench.pick_models(models, ["dense", "student-r0.3"], work)


def test_chat_stage_rows_match_independent_computations(chat_run, work, source):
    paths, rows, logged = chat_run
    assert rows == bench.read_jsonl(paths["rows_file"])
    assert [r["model"] for r in rows] == MODELS
    store = json.loads(paths["answers_file"].read_text())
    assert store["prompt_texts"] == CHAT_PROMPTS and store["max_new_tokens"] == 10 and set(store["models"]) == set(MODELS)
    teacher, tokenizer = load(source)
    dense_answers = store["models"]["dense"]["answers"]
    for row, spec in zip(rows, [source, work / "student-r0.2", work / "healed-r0.2-262k"]):
        got = store["models"][row["model"]]
        model, own_tokenizer = load(spec)
        # The stored answers are the model's greedy chat answers with the recorded settings.
        assert got["answers"] == generate_chat_answers(model, own_tokenizer, CHAT_PROMPTS, max_new_tokens=10,
                                                       batch_size=3)
        assert row["max_new_tokens"] == 10 and row["batch_size"] == 3 and row["prompts"] == len(CHAT_PROMPTS)
        assert row["prompts_sha256"] == bench.prompts_sha256(CHAT_PROMPTS)
        assert row["non_empty"] == sum(bool(a.strip()) for a in got["answers"]) / len(CHAT_PROMPTS)
        assert row["first_sentence_match"] == sum(first_sentence(a) == first_sentence(d) for a, d in
                                                  zip(got["answers"], dense_answers)) / len(CHAT_PROMPTS)
        assert row["cut_at_limit"] == sum(not f for f in got["finished"]) / len(CHAT_PROMPTS)
        assert all(0 <= t <= 10 for t in got["tokens"]) and row["generated_tokens"] == sum(got["tokens"])
        nll, count = answer_nll(teacher, tokenizer, CHAT_PROMPTS, got["answers"])
        assert row["answer_tokens"] == count
        assert (row["teacher_nll"] is None) if count == 0 else row["teacher_nll"] == pytest.approx(nll, rel=1e-6)
    dense = rows[0]
    assert dense["kind"] == "dense" and dense["first_sentence_match"] == 1.0
    assert dense_answers[0] == "" and 0 < dense["non_empty"] < 1  # the tiny model ends its turn at once once
    assert rows[2]["kind"] == "healed" and rows[2]["heal_row"] == "r0.2-262k" and rows[2]["budget_tokens"] == 262144
    assert any("healed-r0.2-262k: non-empty" in line for line in logged)


def test_chat_stage_resumes_without_recomputing(chat_run, work, source, monkeypatch):
    from hf_compress import sources
    from hf_compress.evaluation import chat

    paths, rows, _ = chat_run
    before = paths["rows_file"].read_bytes(), paths["answers_file"].read_bytes()

    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be loaded or generated again")

    # Every row there: nothing is loaded.
    monkeypatch.setattr(sources, "load_causal_lm", refuse)
    logged: list[str] = []
    assert bench.chat_stage(work, source=str(source), max_new_tokens=10, batch_size=3, log=logged.append,
                            **paths) == []
    assert logged == [f"chat {name}: already measured" for name in MODELS]
    assert (paths["rows_file"].read_bytes(), paths["answers_file"].read_bytes()) == before
    monkeypatch.undo()

    # The last row lost (stopped after the answers, before the row): scored again from the kept answers.
    paths["rows_file"].write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    monkeypatch.setattr(chat, "generate_chat_outputs", refuse)
    again = bench.chat_stage(work, source=str(source), max_new_tokens=10, batch_size=3, log=lambda _: None, **paths)
    timing = {"metrics_wall_time_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in again] == \
           [{k: v for k, v in rows[2].items() if k not in timing}]
    assert bench.read_jsonl(paths["rows_file"])[:2] == rows[:2] and len(bench.read_jsonl(paths["rows_file"])) == 3
    assert paths["answers_file"].read_bytes() == before[1]

    # Other settings than the kept answers: refused, nothing mixed.
    with pytest.raises(SystemExit, match="other settings .*max_new_tokens: 10, now 12"):
        bench.chat_stage(work, source=str(source), max_new_tokens=12, batch_size=3, **paths)


def test_chat_stage_refuses_rows_of_other_weights_until_replaced(chat_run, work, source, tmp_path, monkeypatch):
    """A student converted again under the same name: its stored row and answers are refused until `replace` drops
    and measures them again; the other models' rows stay as they were."""
    from safetensors.torch import load_file, save_file

    from hf_compress.evaluation import chat

    paths, rows, _ = chat_run
    models = bench.bench_models(work, str(source))
    # Each row names the weights it was measured on (the dense source has no checkpoint folder).
    assert [r["checkpoint_sha256"] for r in rows] == [None] + [bench.checkpoint_sha256(m) for m in models[1:]]
    assert rows[1]["checkpoint_sha256"] != rows[2]["checkpoint_sha256"]
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    results = {key: tmp_path / path.name for key, path in paths.items()}
    for key, path in paths.items():
        shutil.copy(path, results[key])
    before = bench.read_jsonl(results["rows_file"])
    weights = copy / "student-r0.2" / "model.safetensors"
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    run = lambda **kw: bench.chat_stage(copy, source=str(source), max_new_tokens=10, batch_size=3,
                                        log=lambda _: None, **results, **kw)
    with pytest.raises(SystemExit, match="^student-r0.2: measured on other weights .* --replace student-r0.2$"):
        run()
    with pytest.raises(SystemExit, match="--replace student-r0.9: not among the models"):
        run(replace=["student-r0.9"])
    assert [r["model"] for r in bench.read_jsonl(results["rows_file"])] == MODELS  # nothing dropped by a refusal

    generated = []
    real = chat.generate_chat_outputs
    monkeypatch.setattr(chat, "generate_chat_outputs",
                        lambda model, *a, **kw: generated.append(model.name_or_path) or real(model, *a, **kw))
    again = run(replace=["student-r0.2"])
    digest = bench.checkpoint_sha256(bench.bench_models(copy, str(source))[1])
    assert [r["model"] for r in again] == ["student-r0.2"] and again[0]["checkpoint_sha256"] == digest
    assert generated == [str(copy / "student-r0.2")]  # the dense answers were kept, not generated again
    assert digest != rows[1]["checkpoint_sha256"]
    assert bench.read_jsonl(results["rows_file"]) == [before[0], before[2], again[0]]
    store = json.loads(results["answers_file"].read_text())
    assert store["models"]["student-r0.2"]["checkpoint_sha256"] == digest
    assert store["models"]["dense"] == json.loads(paths["answers_file"].read_text())["models"]["dense"]


def fake_results(accs: dict[str, float], limit: int, wall: float) -> dict:
    """What run_lm_eval returns for `hfc_zeroshot`, with the given acc per set (acc_norm = acc / 2 where the set
    has it) and a group figure that is deliberately not the plain mean (the rows must compute their own)."""
    results = {task: {"acc,none": acc, "acc_stderr,none": 0.01, "alias": task} for task, acc in accs.items()}
    for task, acc in accs.items():
        if task != "hfc_winogrande":
            results[task]["acc_norm,none"] = acc / 2
    results[ZEROSHOT_GROUP] = {"acc,none": -1.0}
    return {"results": results, "n-samples": {t: {"original": 1000, "effective": limit} for t in accs},
            "lm_eval_version": "0.4.test",
            "hf_compress": {"wall_time_s": wall, "batch_size": 8, "device": "cpu", "dtype": "float32", "limit": limit}}


def test_zeroshot_rows_and_resume(work, source, tmp_path, monkeypatch):
    from hf_compress.evaluation import lm_eval

    calls = []
    per_model = {str(source): 0.5, str(work / "student-r0.2"): 0.3, str(work / "healed-r0.2-262k"): 0.4}

    def fake_run(path, tasks, *, limit, gguf_file, batch_size, device):
        calls.append((path, tuple(tasks), limit, gguf_file, batch_size, device))
        base = per_model[path]
        return fake_results({t: base + 0.01 * i for i, t in enumerate(ZEROSHOT_SETS)}, limit, 60.0)

    monkeypatch.setattr(lm_eval, "run_lm_eval", fake_run)
    rows_file = tmp_path / "quick_heal_zeroshot.jsonl"
    run = lambda limit: bench.zeroshot_stage(work, source=str(source), limit=limit, rows_file=rows_file,
                                             log=lambda _: None)
    rows = run(7)
    assert calls == [(spec, (ZEROSHOT_GROUP,), 7, None, 8, "cpu") for spec in per_model]
    assert [r["model"] for r in rows] == MODELS and bench.read_jsonl(rows_file) == rows
    for r, base in zip(rows, per_model.values()):
        accs = [base + 0.01 * i for i in range(len(ZEROSHOT_SETS))]
        norms = [a / 2 for a, t in zip(accs, ZEROSHOT_SETS) if t != "hfc_winogrande"]
        assert r["mean_acc"] == pytest.approx(sum(accs) / 6) and r["mean_acc_norm"] == pytest.approx(sum(norms) / 5)
        assert r["group_acc"] == -1.0 and r["limit"] == 7 and r["wall_time_s"] == 60.0
        assert r["tasks"]["hfc_winogrande"] == {"acc": pytest.approx(accs[list(ZEROSHOT_SETS).index("hfc_winogrande")]),
                                                "n": 7}
    assert [r["kind"] for r in rows] == ["dense", "unhealed", "healed"]

    calls.clear()
    assert run(7) == [] and calls == []  # resumed: every model already there with this limit
    assert [r["model"] for r in run(9)] == MODELS and len(calls) == 3  # another limit is another measurement
    assert len(bench.read_jsonl(rows_file)) == 6
    # Each row names the weights it was measured on; a row of other weights under the same name is refused.
    models = bench.bench_models(work, str(source))
    assert [r["checkpoint_sha256"] for r in rows] == [None] + [bench.checkpoint_sha256(m) for m in models[1:]]
    stored = bench.read_jsonl(rows_file)
    stored[1]["checkpoint_sha256"] = "0" * 64
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in stored))
    with pytest.raises(SystemExit, match="^student-r0.2: zero-shot rows in quick_heal_zeroshot.jsonl measured on "
                                         "other weights"):
        run(7)


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "zeroshot").is_dir(), reason="needs the local zero-shot sets (../shared/data)")
def test_zeroshot_stage_with_lm_eval(work, source, tmp_path):
    """The real lm-eval runner on the six local sets, 2 items each, for the healed tiny model."""
    rows = bench.zeroshot_stage(work, source=str(source), names=["healed-r0.2-262k"], limit=2, batch_size=4,
                                rows_file=tmp_path / "zs.jsonl", log=lambda _: None)
    (row,) = rows
    assert set(row["tasks"]) == set(ZEROSHOT_SETS) and all(t["n"] == 2 for t in row["tasks"].values())
    accs = [t["acc"] for t in row["tasks"].values()]
    assert all(a in (0.0, 0.5, 1.0) for a in accs)
    assert row["mean_acc"] == pytest.approx(sum(accs) / 6) == pytest.approx(row["group_acc"])
    assert "acc_norm" not in row["tasks"]["hfc_winogrande"] and "acc_norm" in row["tasks"]["hfc_piqa"]


def zeroshot_rows(work, source, healed_mean: float, unhealed_mean: float) -> list[dict]:
    models = {m.name: m for m in bench.bench_models(work, str(source))}
    rows = []
    for name, mean in (("dense", 0.5), ("student-r0.2", unhealed_mean), ("healed-r0.2-262k", healed_mean)):
        results = fake_results({t: mean for t in ZEROSHOT_SETS}, 200, 1800.0)
        rows.append({**bench.zeroshot_row(models[name], results, 200), "note": ""})
    return rows


@pytest.mark.parametrize("healed_mean, verdict", [(0.41, "met"), (0.39, "missed")])
def test_report_tables_targets_and_exchange(chat_run, work, source, tmp_path, monkeypatch, healed_mean, verdict):
    paths, rows, _ = chat_run
    results = tmp_path / "benchmarks" / "results"
    shutil.copytree(REPO / "benchmarks" / "results", results,
                    ignore=shutil.ignore_patterns("quick_heal_chat*", "quick_heal_zeroshot*"))
    shutil.copy(paths["rows_file"], results)
    shutil.copy(paths["answers_file"], results)
    (results / "quick_heal_zeroshot.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in zeroshot_rows(work, source, healed_mean, 0.4)))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- results-summary:start -->\n<!-- results-summary:end -->\n\nOne exchange:\n\n"
                      "<!-- chat-exchange:start -->\n<!-- chat-exchange:end -->\n\n## After\n")
    for name, value in {"ROOT": tmp_path, "RESULTS": results, "RESULTS_README": results / "README.md",
                        "MAIN_README": readme, "EXCHANGE_FILE": results / "quick_heal_chat_exchange.md"}.items():
        monkeypatch.setattr(report, name, value)
    monkeypatch.setattr(sys, "argv", ["report.py"])
    report.main()
    text = (results / "README.md").read_text()

    # The chat table: one line per model, figures formatted from the rows.
    labels = {"dense": "dense", "student-r0.2": "20% unhealed", "healed-r0.2-262k": "20% healed (262,144 tokens)"}
    chat_part = text.split("Chat behaviour (", 1)[1].split("Zero-shot (", 1)[0]
    for r in rows:
        line = next(line for line in chat_part.splitlines() if line.startswith(f"| {labels[r['model']]} | "))
        assert f"| {100 * r['non_empty']:.1f}% | {100 * r['first_sentence_match']:.1f}% |" in line
    # The zero-shot table and both new targets, judged from the files.
    assert "| 20% healed (262,144 tokens) | " + " | ".join([f"{healed_mean:.3f} / {healed_mean / 2:.3f}"] * 3) in text
    healed = rows[2]
    chat_verdict = "met" if healed["non_empty"] >= 0.9 else "missed"
    targets = text.split("Targets, one line per run:\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert (f"- healed-r0.2-262k: {100 * healed['non_empty']:.1f}% of the {len(CHAT_PROMPTS)} chat prompts answered "
            f"against at least 90% ({chat_verdict})") in targets
    assert (f"- healed-r0.2-262k: mean zero-shot acc {healed_mean:.3f} against 0.400 for student-r0.2, to be above it "
            f"(200 items per set; {verdict})") in targets

    # The exchange: the first prompt, the measured answers of dense / unhealed / healed, in the README too.
    store = json.loads(paths["answers_file"].read_text())
    cells = []
    for name in MODELS:
        answer = store["models"][name]["answers"][0]
        cell = report.md_cell(answer) or "*(no answer: the model ends its turn at once)*"
        cells.append(cell + ("" if store["models"][name]["finished"][0] else " *[cut at 10 tokens]*"))
    row = "| " + " | ".join(cells) + " |"
    exchange = (results / "quick_heal_chat_exchange.md").read_text()
    assert f"> {CHAT_PROMPTS[0]}\n" in exchange and row in exchange.splitlines()
    assert "| dense | 20% unhealed | 20% healed (262,144 tokens) |" in exchange
    main = readme.read_text()
    block = main.split("<!-- chat-exchange:start -->\n", 1)[1].split("\n<!-- chat-exchange:end -->", 1)[0]
    assert row in block.splitlines() and "`benchmarks/results/quick_heal_chat_answers.json`" in block
    assert main.endswith("\n\n## After\n") and row in text.splitlines()

    # Written once, the files are up to date.
    with pytest.raises(SystemExit) as info:
        monkeypatch.setattr(sys, "argv", ["report.py", "--check"])
        report.main()
    assert info.value.code == 0


def test_exchange_cells_and_missing_models():
    assert report.md_cell(" a | b <c>\n\n  d & e ") == "a \\| b &lt;c&gt;<br><br>d &amp; e"
    assert report.chat_exchange(None, []) == ""
    rows = [{"model": "dense", "kind": "dense", "ratio": 0.0}]
    assert report.chat_exchange({"models": {"dense": {}}}, rows) == ""  # no 20% rows yet: nothing to show
    assert math.isclose(report.std_error(0.5, 200) / math.sqrt(6), 0.0144, abs_tol=1e-4)


def test_students_are_named_and_found_by_their_conversion(tmp_path):
    rows = {row.name: row for rows in bench.ROWS.values() for row in rows}
    names = {"student-r0.2": (0.2, True, 0.0, 2), "student-r0.2-nosequential": (0.2, False, 0.0, 2),
             "student-r0.3-calchat25": (0.3, True, 0.25, 2), "student-r0.2-nosequential-calchat10": (0.2, False, 0.1, 2),
             "student-r0.2-g1": (0.2, True, 0.0, 1), "student-r0.4-nosequential-g4": (0.4, False, 0.0, 4)}
    for name, args in names.items():
        assert bench.student_name(*args) == name
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "healed-r0.2-131k-calchat25").mkdir()
    (tmp_path / "healed-r0.2-131k-calchat25" / "config.json").write_text("{}")
    (tmp_path / "healed-r0.2-262k-chat25-b64-kl+lm-b2-g1").mkdir()
    (tmp_path / "healed-r0.2-262k-chat25-b64-kl+lm-b2-g1" / "config.json").write_text("{}")
    assert rows["r0.2-131k-calchat25"].student == "student-r0.2-calchat25"
    assert rows["r0.2-262k-chat25-b64-kl+lm-b2-g1"].student == "student-r0.2-g1"
    assert bench.student_name(0.2, group_size=BasisSharingConfig().group_size) == "student-r0.2"
    found = {m.name: (m.ratio, m.sequential, m.calib_chat, m.group_size, m.kind) for m in bench.bench_models(tmp_path)}
    assert found == {"dense": (0.0, True, 0.0, 2, "dense"),
                     **{name: (*args, "unhealed") for name, args in names.items()},
                     "healed-r0.2-131k-calchat25": (0.2, True, 0.25, 2, "healed"),
                     "healed-r0.2-262k-chat25-b64-kl+lm-b2-g1": (0.2, True, 0.0, 1, "healed")}
    assert bench.BenchModel("x", "x", 0.2, "unhealed", calib_chat=0.25).describe()["calib_chat_fraction"] == 0.25


def test_zeroshot_default_models_take_every_data_mix():
    """The stage's default: dense, the 20% student and each 20% model healed with the full budget and the KL on the
    factors, plain or with chat text; not other ratios, budgets, objectives or conversion settings."""
    M = bench.BenchModel
    models = [M("dense", "smollm2", 0.0, "dense"), M("student-r0.2", "s", 0.2, "unhealed"),
              M("student-r0.2-nosequential", "s", 0.2, "unhealed", sequential=False),
              M("student-r0.2-calchat25", "s", 0.2, "unhealed", calib_chat=0.25),
              M("student-r0.2-g1", "s", 0.2, "unhealed", group_size=1),
              M("student-r0.3", "s", 0.3, "unhealed"),
              M("healed-r0.2-131k", "h", 0.2, "healed", budget_tokens=131072),
              M("healed-r0.2-262k", "h", 0.2, "healed", budget_tokens=262144),
              M("healed-r0.2-262k-chat25", "h", 0.2, "healed", budget_tokens=262144,
                heal_options={"chat_fraction": 0.25}),
              M("healed-r0.2-262k-chat25-b64", "h", 0.2, "healed", budget_tokens=262144,
                heal_options={"chat_fraction": 0.25, "chat_batch_size": 64}),
              M("healed-r0.2-262k-lora", "h", 0.2, "healed", budget_tokens=262144, heal_options={"trainable": "lora"}),
              M("healed-r0.2-262k-g1", "h", 0.2, "healed", budget_tokens=262144, group_size=1),
              M("healed-r0.3-262k", "h", 0.3, "healed", budget_tokens=262144)]
    assert [m.name for m in bench.zeroshot_models(models)] == [
        "dense", "student-r0.2", "healed-r0.2-262k", "healed-r0.2-262k-chat25", "healed-r0.2-262k-chat25-b64"]


def test_targets_name_each_data_mix_and_the_pipeline_time():
    """Each healed model at the full budget gets its own verdicts, each naming its run (row or model); the time of
    conversion and healing is judged on the row healed with a chat model's default data only, from the two calls'
    wall times."""
    main = {"ratio": 0.2, "budget_tokens": 262144, "sequential": True, "c4_before": 98.0, "c4_after": 50.0,
            "conversion_call_wall_time_s": 600.0}
    plain = {**main, "row": "r0.2-262k", "wikitext2_after": 44.0, "heal_call_wall_time_s": 1500.0,
             "heal_options": {"trainable": "factors", "loss": "kl", "chat_fraction": 0.0}}
    chat = {**main, "row": "r0.2-262k-chat25", "wikitext2_after": 47.5, "heal_call_wall_time_s": 1860.0,
            "heal_options": {"trainable": "factors", "loss": "kl", "chat_fraction": 0.25}}
    lora = {**chat, "row": "r0.2-262k-lora", "heal_options": {"trainable": "lora", "loss": "kl",
                                                              "chat_fraction": 0.25}}
    wide = {**plain, "row": "r0.4-262k", "ratio": 0.4, "wikitext2_after": 90.0, "c4_before": 300.0,
            "c4_after": 80.0}  # no WikiText-2 target at 40%
    bench_rows = {"ratio": 0.2, "sequential": True, "budget_tokens": 262144, "prompts": 72, "limit": 200}
    chat_rows = [{**bench_rows, "model": "healed-r0.2-262k", "kind": "healed", "heal_options": {}, "non_empty": 0.25},
                 {**bench_rows, "model": "healed-r0.2-262k-chat25", "kind": "healed", "non_empty": 0.95,
                  "heal_options": {"chat_fraction": 0.25}}]
    zeroshot = [{**bench_rows, "model": "student-r0.2", "kind": "unhealed", "budget_tokens": None, "mean_acc": 0.40},
                {**chat_rows[0], "mean_acc": 0.41}, {**chat_rows[1], "mean_acc": 0.39},
                {**chat_rows[1], "mean_acc": 0.45, "limit": 20}]  # fewer items: not the row judged
    checks = report.heal_targets([plain, chat, lora, wide], {"c4": 30.0}, chat_rows, zeroshot)
    assert checks == [
        "r0.2-262k: WikiText-2 44.00 against at most 45 (met)",
        "r0.2-262k: C4 validation 50.00 against at most twice the dense model's (60.00; met)",
        "r0.2-262k-chat25: WikiText-2 47.50 against at most 45 (missed)",
        "r0.2-262k-chat25: C4 validation 50.00 against at most twice the dense model's (60.00; met)",
        "healed below unhealed on C4 validation at every ratio (r0.2-262k 98.00 -> 50.00, r0.2-262k-chat25 "
        "98.00 -> 50.00, r0.4-262k 300.00 -> 80.00; met)",
        "r0.2-262k-chat25: conversion + healing (20% (25% chat text, 16 at a time), 262,144 tokens) 41.0 min "
        "(conversion 10.0 + healing 31.0, loading, chat text and saving included, as two calls) against under 40 "
        "(missed)",
        "healed-r0.2-262k: 25.0% of the 72 chat prompts answered against at least 90% (missed)",
        "healed-r0.2-262k-chat25: 95.0% of the 72 chat prompts answered against at least 90% (met)",
        "healed-r0.2-262k: mean zero-shot acc 0.410 against 0.400 for student-r0.2, to be above it (200 items per "
        "set; met)",
        "healed-r0.2-262k-chat25: mean zero-shot acc 0.390 against 0.400 for student-r0.2, to be above it (200 items "
        "per set; missed)",
    ]
    worse = {**wide, "c4_after": 301.0}
    assert report.heal_targets([plain, worse], None, [], [])[-1].endswith("r0.4-262k 300.00 -> 301.00; missed)")
    faster = {**chat, "row": "r0.2-262k-chat25-b64", "heal_call_wall_time_s": 1700.0,
              "heal_options": {**chat["heal_options"], "chat_batch_size": 64}}
    assert report.heal_targets([faster], None, [], [])[2] == (
        "r0.2-262k-chat25-b64: conversion + healing (20% (25% chat text, 64 at a time), 262,144 tokens) 38.3 min "
        "(conversion 10.0 + healing 28.3, loading, chat text and saving included, as two calls) against under 40 "
        "(met)")


def test_readme_summary_shows_one_healing_row_per_ratio():
    """Per ratio the last row healed as the main rows are with the most chat text; other objectives left out."""
    base = {"budget_tokens": 262144, "sequential": True, "wikitext2_before": 111.0}
    rows = [{**base, "ratio": 0.3, "wikitext2_after": 68.0, "heal_options": {"chat_fraction": 0.0}},
            {**base, "ratio": 0.2, "wikitext2_after": 51.0, "heal_options": {"chat_fraction": 0.0}},
            {**base, "ratio": 0.2, "wikitext2_after": 52.4, "heal_options": {"chat_fraction": 0.25}},
            {**base, "ratio": 0.2, "wikitext2_after": 50.0, "heal_options": {"chat_fraction": 0.25, "loss": "lm"}},
            {**base, "ratio": 0.2, "wikitext2_after": 49.0, "heal_options": {"chat_fraction": 0.25,
                                                                            "chat_batch_size": 64}},
            {**base, "ratio": 0.2, "wikitext2_after": 48.0, "heal_options": {}, "budget_tokens": 131072},
            {**base, "ratio": 0.2, "wikitext2_after": 52.8, "heal_options": {"chat_fraction": 0.25, "hidden_weight": 5.0,
                                                                            "chat_batch_size": 64}},
            {**base, "ratio": 0.3, "wikitext2_after": 62.5, "heal_options": {"chat_fraction": 0.25, "hidden_weight": 0.0,
                                                                            "loss": "kl+lm", "batch_size": 2}},
            # The factors balanced before training: not the library's default, so not a main row.
            {**base, "ratio": 0.2, "wikitext2_after": 47.0, "heal_options": {"chat_fraction": 0.25, "loss": "kl+lm",
                                                                            "batch_size": 2, "balance_factors": True}}]
    assert [r["wikitext2_after"] for r in report.summary_heal_rows(rows)] == [49.0, 62.5]


@pytest.mark.parametrize("resumed_from", [0, 40])
def test_heal_row_times_the_calls_a_user_waits_for(tmp_path, monkeypatch, resumed_from):
    """A row keeps the training seconds `heal` reports and, apart, the wall time of the conversion and healing calls
    (loading, chat text and saving included); a resumed healing has no whole-call time."""
    import time
    from types import SimpleNamespace

    import hf_compress.basis_sharing as basis_sharing
    import hf_compress.healing as healing
    import hf_compress.sources as sources

    def fake_convert(source, folder, config, calibration, overwrite):
        time.sleep(0.2)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        return SimpleNamespace(wall_time_s=0.01, peak_memory_mb=5.0, achieved_ratio=0.2, timings={})

    def fake_heal(student, output, teacher, config, overwrite):
        time.sleep(0.3)
        return SimpleNamespace(wall_time_s=0.02, tokens_per_s=1.0, resumed_from=resumed_from, trainable_params=7,
                               steps=2, tokens=config.tokens, initial_loss=2.0, final_loss=1.0, losses=[2.0, 1.0],
                               provenance={"healing": {"blockwise": {"tokens": 64, "wall_time_s": 0.5}}})

    monkeypatch.setattr(basis_sharing, "convert", fake_convert)
    monkeypatch.setattr(healing, "heal", fake_heal)
    monkeypatch.setattr(sources, "load_causal_lm", lambda spec: (spec, None))
    perplexities = iter([{"wikitext2": 100.0, "c4": 90.0}, {"wikitext2": 50.0, "c4": 45.0}])
    row = bench.heal_row(bench.Row("r0.2-262k-chat25", 0.2, 262144, {"chat_fraction": 0.25}), tmp_path,
                         lambda tokenizer: lambda model: next(perplexities))
    assert (row["wikitext2_before"], row["wikitext2_after"], row["c4_before"], row["c4_after"]) == (100, 50, 90, 45)
    assert row["conversion_wall_time_s"] == 0.01 and 0.2 <= row["conversion_call_wall_time_s"] < 5
    assert row["heal_wall_time_s"] == 0.02 and row["heal_tokens_per_s"] == 262144 / 0.02
    if resumed_from:
        assert row["heal_call_wall_time_s"] is None
    else:
        assert 0.3 <= row["heal_call_wall_time_s"] < 5
    assert row["heal_options"]["chat_fraction"] == 0.25 and row["heal_options"]["tokens"] == 262144
    assert row["heal_blockwise"] == {"tokens": 64, "wall_time_s": 0.5}  # the block-wise stage's record, as heal gave it


def test_ablations_name_what_they_change_against_the_base_run():
    options = {"tokens": 131072, "lr": 1e-4, "loss": "kl", "trainable": "factors", "chat_fraction": 0.0}
    base = {"row": "r0.2-131k", "ratio": 0.2, "budget_tokens": 131072, "sequential": True, "heal_options": options,
            "wikitext2_before": 110.0, "wikitext2_after": 50.0, "c4_after": 40.0, "heal_dtype": "bfloat16"}
    both = {**base, "row": "r0.2-131k-kl+lm", "heal_options": {**options, "loss": "kl+lm"}, "wikitext2_after": 45.0,
            "c4_after": 41.0}
    faster = {**base, "row": "r0.2-131k-lr3e-4", "heal_options": {**options, "lr": 3e-4}, "wikitext2_after": 55.0}
    unsequential = {**base, "row": "r0.2-131k-nosequential", "sequential": False, "wikitext2_before": 130.0}
    chat_calibrated = {**base, "row": "r0.2-131k-calchat25", "calib_chat_fraction": 0.25, "wikitext2_before": 120.0,
                       "wikitext2_after": 52.0, "c4_after": 38.0}
    unshared = {**base, "row": "r0.2-131k-g1", "group_size": 1, "wikitext2_before": 108.0, "wikitext2_after": 49.0}
    earlier = {**both, "row": "r0.2-131k-chat25", "wikitext2_before": 111.0}  # another conversion of the student
    elsewhere = {**both, "row": "r0.2-131k-old", "heal_dtype": "float32"}  # trained in another precision
    longer = {**both, "row": "r0.2-262k-kl+lm", "budget_tokens": 262144}  # another budget: not an ablation
    wider = {**both, "row": "r0.3-131k-kl+lm", "ratio": 0.3}  # another ratio: not an ablation
    # Written after the layer term existed: its 0 is what the base (which has no such option) trained with.
    steps = {**base, "row": "r0.2-131k-b2", "heal_options": {**options, "batch_size": 2, "hidden_weight": 0.0},
             "wikitext2_after": 48.0}
    layered = {**base, "row": "r0.2-131k-h5", "heal_options": {**options, "hidden_weight": 5.0},
               "wikitext2_after": 47.5, "c4_after": 42.0}
    # Two changes from the base, one from `steps`: compared with `steps`.
    slower = {**base, "row": "r0.2-131k-b2-lr5e-5", "heal_options": {**options, "batch_size": 2, "lr": 5e-5},
              "wikitext2_after": 52.8, "c4_after": 36.0}
    assert report.heal_ablations([both, longer, wider]) == []  # no base run: nothing to compare with
    assert report.heal_ablations([longer, earlier, both, base, faster, wider, elsewhere, unsequential,
                                  chat_calibrated, slower, steps, layered, unshared]) == [
        "r0.2-131k-kl+lm (loss kl+lm): WikiText-2 45.00 (10.0% lower), C4 validation 41.00 (2.5% higher)",
        "r0.2-131k-lr3e-4 (lr 0.0003): WikiText-2 55.00 (10.0% higher), C4 validation 40.00 (0.0% higher)",
        "r0.2-131k-nosequential (no sequential calibration): WikiText-2 50.00 (0.0% higher), C4 validation 40.00 "
        "(0.0% higher)",
        "r0.2-131k-calchat25 (calibration 25% chat text): WikiText-2 52.00 (4.0% higher), C4 validation 38.00 "
        "(5.0% lower)",
        "r0.2-131k-b2-lr5e-5 (lr 5e-05 against r0.2-131k-b2): WikiText-2 52.80 (10.0% higher), C4 validation 36.00 "
        "(10.0% lower)",
        "r0.2-131k-b2 (batch_size 2): WikiText-2 48.00 (4.0% lower), C4 validation 40.00 (0.0% higher)",
        "r0.2-131k-h5 (hidden_weight 5): WikiText-2 47.50 (5.0% lower), C4 validation 42.00 (5.0% higher)",
        "r0.2-131k-g1 (group size 1): WikiText-2 49.00 (2.0% lower), C4 validation 40.00 (0.0% higher)",
    ]


def test_conversion_changes_name_what_differs_from_the_default_conversion():
    assert report.GROUP_SIZE == BasisSharingConfig().group_size  # the report's default is the library's
    assert report.conversion_changes({"ratio": 0.2}) == []  # rows from before the fields: the default conversion
    assert report.conversion_changes({"sequential": True, "calib_chat_fraction": 0.0, "group_size": 2}) == []
    assert report.conversion_changes({"sequential": False, "calib_chat_fraction": 0.25, "group_size": 1}) == [
        "no sequential calibration", "calibration 25% chat text", "group size 1"]
    healed = {"model": "healed-r0.2-262k-g1", "kind": "healed", "ratio": 0.2, "budget_tokens": 262144,
              "heal_options": {"loss": "kl+lm"}, "group_size": 1}
    assert report.bench_row_label(healed) == "20% healed (262,144 tokens, loss kl+lm), group size 1"
    unhealed = {"model": "student-r0.2-g1", "kind": "unhealed", "ratio": 0.2, "group_size": 1}
    assert report.bench_row([unhealed], 0.2, "unhealed") is None  # not the default conversion
    assert report.bench_row([{**unhealed, "group_size": 2}], 0.2, "unhealed")["model"] == "student-r0.2-g1"
    assert report.is_main_heal({"budget_tokens": 262144, "heal_options": {}}) is True
    assert report.is_main_heal({"budget_tokens": 262144, "heal_options": {}, "group_size": 1}) is False
    # A precision set by the row, not left to the machine, makes another setting: not a main row.
    assert report.is_main_heal({"budget_tokens": 262144, "heal_options": {"dtype": "auto", "loss": "kl+lm",
                                                                         "batch_size": 2}}) is True
    assert report.is_main_heal({"budget_tokens": 262144, "heal_options": {"dtype": "float32"}}) is False


def test_position_nll_averages_to_the_window_perplexity(work):
    from hf_compress.evaluation.perplexity import window_losses

    model, _ = load(work / "student-r0.2")
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3 * 64 + 10,))
    nll = bench.position_nll(model, ids, seq_len=64, max_windows=5, logit_chunk=7)
    assert nll.shape == (63,) and nll.dtype == torch.float64
    # Three full windows: the mean over positions of their mean NLL is the mean of the windows' NLLs.
    with torch.no_grad():
        windows = window_losses(model, ids, seq_len=64, progress=False)
    assert len(windows) == 3
    assert math.isclose(nll.mean().item(), sum(windows) / 3, rel_tol=1e-5)
    # Position 0 of the first window, by a direct forward.
    with torch.no_grad():
        first = torch.stack([model(ids[w * 64:(w + 1) * 64].unsqueeze(0)).logits[0, 0].float() for w in range(3)])
    direct = torch.nn.functional.cross_entropy(first, ids[torch.tensor([1, 65, 129])]).item()
    assert math.isclose(nll[0].item(), direct, rel_tol=1e-5)


def test_positions_table_by_bucket(tmp_path):
    nll = torch.log(torch.tensor([2.0] * 512 + [4.0] * 512 + [8.0] * 511, dtype=torch.float64))
    assert [round(v, 9) for v in bench.bucket_perplexities(nll)] == [2.0, 4.0, 8.0]
    store = {"bucket": 512, "models": {
        "dense": {"wikitext2": [10.0, 8.0], "c4": [20.0, 16.0], "note": ""},
        "healed-x": {"wikitext2": [20.0, 24.0], "c4": [30.0, 24.0], "note": "busy machine"}}}
    assert bench.positions_table(store).splitlines()[4:] == [
        "WikiText-2 quick (first 20 windows):", "",
        "| model | 0-511 | 512-1023 | last / first bucket, x dense |", "|---|---|---|---|",
        "| dense | 10.00 | 8.00 | - |",
        "| healed-x | 20.00 (2.00x) | 24.00 (3.00x) | 1.50 |", "",
        "C4 validation (first 20 windows):", "",
        "| model | 0-511 | 512-1023 | last / first bucket, x dense |", "|---|---|---|---|",
        "| dense | 20.00 | 16.00 | - |",
        "| healed-x | 30.00 (1.50x) | 24.00 (1.50x) | 1.00 |", "",
        "Note: busy machine"]


def test_report_positions_lines():
    store = {"bucket": 512, "models": {
        "dense": {"kind": "dense", "wikitext2": [10.0, 8.0, 5.0], "c4": [20.0, 16.0, 10.0]},
        "student-r0.2": {"kind": "unhealed", "wikitext2": [50.0, 40.0, 30.0], "c4": [60.0, 48.0, 20.0]},
        "healed-x": {"kind": "healed", "wikitext2": [25.0, 20.0, 15.0], "c4": [30.0, 24.0, 15.0]}}}
    assert report.heal_positions(store) == [
        "student-r0.2: WikiText-2 5.00x dense over positions 0-511, 6.00x over 1024-1535; C4 validation 3.00x and 2.00x",
        "healed-x: WikiText-2 2.50x dense over positions 0-511, 3.00x over 1024-1535; C4 validation 1.50x and 1.50x"]
    assert report.heal_positions(None) == [] and report.heal_positions({"bucket": 512, "models": {}}) == []


def test_report_calibration_chat_lines():
    students = {
        "student-r0.2": {"ratio": 0.2, "sequential": True, "calib_chat_fraction": 0.0, "wikitext2": 100.0, "c4": 80.0},
        "student-r0.2-nosequential": {"ratio": 0.2, "sequential": False, "calib_chat_fraction": 0.0,
                                      "wikitext2": 130.0, "c4": 90.0},
        "student-r0.2-calchat25": {"ratio": 0.2, "sequential": True, "calib_chat_fraction": 0.25,
                                   "wikitext2": 110.0, "c4": 72.0},
        "student-r0.3-calchat25": {"ratio": 0.3, "sequential": True, "calib_chat_fraction": 0.25,
                                   "wikitext2": 200.0, "c4": 150.0}}  # no text-only student at 30%: no line
    chat = [{"model": "student-r0.2", "non_empty": 0.125}, {"model": "student-r0.2-calchat25", "non_empty": 0.5}]
    assert report.calibration_chat_lines(students, chat) == [
        "student-r0.2-calchat25 (25% of the calibration samples chat text): WikiText-2 110.00 against 100.00 for "
        "student-r0.2 (10.0% higher), C4 validation 72.00 against 80.00 (10.0% lower); chat prompts answered 50.0% "
        "against 12.5%"]
    assert report.calibration_chat_lines(students, [])[0].endswith("(10.0% lower)")
    assert report.calibration_chat_lines(None, chat) == []


def test_students_stage_keeps_each_student_once(tmp_path, monkeypatch):
    calls = []

    def fake_student(row, work, evaluator_of):
        calls.append(row.student)
        return work / row.student, {"wikitext2": 100.0 + len(calls), "c4": 80.0, "conversion": {"wall_time_s": 1.0}}

    monkeypatch.setattr(bench, "student", fake_student)
    rows = [bench.Row("a", 0.2, 131072), bench.Row("b", 0.2, 131072, calib_chat=0.25),
            bench.Row("c", 0.2, 262144),  # the same student as "a"
            bench.Row("d", 0.2, 262144, group_size=1)]
    out = tmp_path / "students.json"
    store = bench.students_stage(tmp_path, rows, None, out_file=out, note="idle")
    assert calls == ["student-r0.2", "student-r0.2-calchat25", "student-r0.2-g1"]
    assert store == json.loads(out.read_text()) == {
        "student-r0.2": {"ratio": 0.2, "sequential": True, "calib_chat_fraction": 0.0, "group_size": 2,
                         "wikitext2": 101.0, "c4": 80.0, "conversion": {"wall_time_s": 1.0}, "note": "idle"},
        "student-r0.2-calchat25": {"ratio": 0.2, "sequential": True, "calib_chat_fraction": 0.25, "group_size": 2,
                                   "wikitext2": 102.0, "c4": 80.0, "conversion": {"wall_time_s": 1.0}, "note": "idle"},
        "student-r0.2-g1": {"ratio": 0.2, "sequential": True, "calib_chat_fraction": 0.0, "group_size": 1,
                            "wikitext2": 103.0, "c4": 80.0, "conversion": {"wall_time_s": 1.0}, "note": "idle"}}
    bench.students_stage(tmp_path, rows, None, out_file=out)
    assert len(calls) == 3  # measured once


def test_heal_table_gap_closed(tmp_path, monkeypatch):
    """The table's gap-closed columns: log(before / after) / log(before / dense), here 1/2 and 1/3 exactly."""
    monkeypatch.setattr(bench, "ROWS_FILE", tmp_path / "rows.jsonl")
    monkeypatch.setattr(bench, "TABLE_FILE", tmp_path / "table.md")
    (tmp_path / "dense_eval.json").write_text(json.dumps({"wikitext2": 10.0, "c4": 8.0}))
    bench.append_row({"row": "r0.2-x", "ratio": 0.2, "budget_tokens": 1024, "heal_trainable_params": 7,
                      "wikitext2_before": 100.0, "wikitext2_after": math.sqrt(1000.0),
                      "c4_before": 64.0, "c4_after": 32.0,
                      "heal_wall_time_s": 5.0, "heal_tokens_per_s": 2.0, "heal_peak_rss_mb": 3.0})
    assert bench.gap_closed(100.0, 10.0, 10.0) == 1.0 and bench.gap_closed(100.0, 100.0, 10.0) == 0.0
    bench.write_table(tmp_path)
    row = (tmp_path / "table.md").read_text().splitlines()[6]
    assert row == ("| r0.2-x | 20% | 1,024 | 7 | 100.00 -> 31.62 | 50% | 64.00 -> 32.00 | 4.00x | 33% "
                   "| 5 | 2 | 3 |")


def test_report_gap_lines_per_ratio_target_and_budget():
    """The share of the log-perplexity gap: the README row per ratio, what the 20% target asks, the same healing on
    another budget (a row with other options at that budget is left out)."""
    dense = {"wikitext2": 10.0, "c4": 8.0}
    options = {"tokens": 262144, "loss": "kl+lm", "batch_size": 2, "lr": 1e-4, "trainable": "factors",
               "chat_fraction": 0.25}
    main = {"row": "r0.2-a", "ratio": 0.2, "budget_tokens": 262144, "heal_options": options, "heal_dtype": "bfloat16",
            "wikitext2_before": 100.0, "wikitext2_after": math.sqrt(1000.0), "c4_before": 64.0, "c4_after": 32.0}
    # written after `hidden_weight` and `balance_factors` existed: it names them, at their first values
    longer = {**main, "row": "r0.2-b", "budget_tokens": 524288,
              "heal_options": {**options, "tokens": 524288, "hidden_weight": 0.0, "balance_factors": False},
              "wikitext2_after": 100.0 * 0.1 ** 0.6, "c4_after": 16.0}
    other = {**longer, "row": "r0.2-c", "heal_options": {**longer["heal_options"], "lr": 2e-4}}
    assert report.heal_gap_lines([main, longer, other], dense) == [
        "At 20% (r0.2-a): 50% of the WikiText-2 gap, 33% of the C4-validation gap",
        "WikiText-2 at most 45 at 20% asks for 35% of its gap",  # log(100 / 45) / log(10) = 0.347
        "r0.2-b (524,288 tokens, otherwise as r0.2-a): WikiText-2 25.12, 60% of the gap; C4 validation 16.00, 67%"]
    assert report.heal_gap_lines([main], None) == [] and report.heal_gap_lines([longer], dense) == []
