"""A search whose teacher and student use different tokenizers, end to end: the trials, the control
arm, the exported student (with the student's own tokenizer) reloaded and generating; once reading
the teacher cache, once from the served teacher."""

import json

import pytest
import torch

import tokenizer_zoo
from conftest import search_raw
from tune_kd.config.experiment import load_config
from tune_kd.data import inputs
from tune_kd.kd.scored import ScoredLM
from tune_kd.model import hardware
from tune_kd.train.evaluate import evaluate

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("served", [False, True], ids=["teacher cache", "served teacher"])
def test_a_search_across_tokenizers_runs_exports_and_reloads(world, tmp_path, served):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tune_kd.search import runner

    student_tokenizer = tokenizer_zoo.save("chatml", tmp_path / "student_tokenizer")
    raw = search_raw(world, num_samples=2, train={"epochs": 2, "batch_size": 64},
                     data={"max_seq_len": 160, "cache_dir": str(tmp_path / "cache")},
                     controls={"plain_sft": True, "seeds": 0},
                     teacher_cache={"mode": "off" if served else "on"},
                     teacher_server={"mode": "on" if served else "off"})
    raw["student"] = {"arch": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                               "intermediate_size": 64, "max_position_embeddings": 256},
                      "tokenizer": str(student_tokenizer)}
    raw["parameters"]["kd_loss"] = {"distribution": "values", "values": ["uld", "gold_hybrid"]}
    cfg = load_config(raw=raw)
    summary = runner.run_search(cfg, "test", storage=str(tmp_path), num_cpus=2)
    experiment = tmp_path / "tiny-search"
    statuses = [r["status"] for r in summary["rows"]]
    assert len(statuses) == 2 and "COMPLETED" in statuses and set(statuses) <= {"COMPLETED", "STOPPED_EARLY"}
    if not served:
        assert list((tmp_path / "cache" / "teacher").glob("*/meta.json")), "the teacher cache was built"
    controls = json.loads((experiment / "controls.json").read_text())
    assert "plain_sft" in controls["arms"] and controls["verdict"]

    best = json.loads((experiment / "best.json").read_text())
    exported = experiment / "best_student"
    assert AutoTokenizer.from_pretrained(str(exported)).get_vocab() == \
        AutoTokenizer.from_pretrained(str(student_tokenizer)).get_vocab()          # the student's own tokenizer
    student = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32)
    tokenizer, _, val_data = inputs.load_data(cfg)
    metrics = evaluate(ScoredLM(student), None, val_data, tokenizer.pad_token_id, cfg,
                       hardware.resolve_precision("float32", torch.device("cpu")))
    assert metrics["val_ce"] == pytest.approx(best["best_val_ce"], rel=1e-5)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "3+4="}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = student.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
