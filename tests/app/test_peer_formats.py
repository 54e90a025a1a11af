"""benchmarks/peer_llmcompressor.py's servable-format rows (issue 30): the cache keys of the W4A4 rows it had before
are unchanged (their committed results stay valid), the new rows' configs are the presets the brief names, the peer's
transform is picked on draw 0, and the goal column says "met" only when both texts are under the goal and ahead of
the peer's best. Nothing here runs a model or the peer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import peer_llmcompressor as peer  # noqa: E402

PROTO = dict(n_eval=4, seq=256, n_calib=8, sources=["boolq", "sciq"], calib_source="boolq")


def test_existing_rows_keep_their_cache_keys():
    # file names (16 hex digits of the key's sha256) of the rows as they were before the servable formats were added
    ours = {"fp": "e53ed967e8458057", "rtn": "8f8be7d3ea48a94a", "rot-rtn": "2fe60d4cd0d785e5", "best": "52b049e60eb64483"}
    theirs = {"fp": "cb386a04cb98cfa5", "rtn": "9f5e2ea9bcc62a4f", "rot-rtn": "7d3374131036a77a", "best": "0bd4c1e832a789cf"}
    assert {r: peer._digest(peer.our_key(r, PROTO, 0, 1)) for r in ours} == ours
    assert {r: peer._digest(peer.peer_key(r, PROTO, 0, 1)) for r in theirs} == theirs


def test_format_rows_use_the_servable_presets():
    from rolora_plugin import RotationConfig
    from rolora_plugin.quant import QuantConfig

    for fmt, preset in (("int", "w4a4-int"), ("nvfp4", "nvfp4"), ("mxfp4", "mxfp4")):
        rot, quant = peer.our_configs(f"{fmt}-had")
        assert rot == RotationConfig(seed=0, r2=True) and quant == QuantConfig.preset(preset)
        assert quant.engine_contract()["servable"]
        rot, quant = peer.our_configs(f"{fmt}-learn")
        assert rot == RotationConfig.preset("w4a4", learn_quant=preset) and quant == QuantConfig.preset(preset)
    assert peer.format_recipe("rot-rtn") is None and peer.format_recipe("best-kv4") is None
    assert peer.format_recipe("nvfp4-quip") == ("nvfp4", "quip")


def test_peer_keys_of_format_rows():
    # the int SpinQuant row runs exactly the "best" row's modifiers: one run, one cache entry
    assert peer.peer_key("int-spin", PROTO, 1, 1) == peer.peer_key("best", PROTO, 1, 1)
    keys = [peer.peer_key(f"{f}-{h}", PROTO, 0, 1) for f in peer.FORMATS for h in peer.PEER_FMT]
    assert len({peer._digest(k) for k in keys}) == len(keys)
    assert peer.peer_key("mxfp4-quip", PROTO, 0, 1)["transform"]["block"] == 32
    assert peer.peer_key("nvfp4-quip", PROTO, 0, 1)["transform"]["block"] == 16
    assert peer.peer_key("nvfp4-spin", PROTO, 0, 1)["scheme"].startswith("preset NVFP4")


def _res(boolq, sciq, wall=1.0):
    return {"ppl": {"boolq": boolq, "sciq": sciq}, "wall_s": wall}


def test_peer_choice_and_goal_column():
    results = {("ours", "fp", None): _res(10, 20), ("peer", "fp", None): _res(10, 20)}
    assert peer.peer_choice(results, "nvfp4") is None
    results[("peer", "nvfp4-spin", 0)] = _res(14, 30)  # 1.4 / 1.5
    results[("peer", "nvfp4-quip", 0)] = _res(13, 28)  # 1.3 / 1.4: better on draw 0
    assert peer.peer_choice(results, "nvfp4") == "quip"
    results[("peer", "nvfp4-quip", 1)] = _res(13, 28)
    results[("ours", "nvfp4-had", 0)] = results[("ours", "nvfp4-had", 1)] = _res(12, 24)  # 1.2 / 1.2
    results[("ours", "nvfp4-learn", 0)] = _res(12, 29)  # SciQ 1.45: over the goal and behind the peer
    text = peer.format_table(results, [0, 1], ["nvfp4"])
    had = next(line for line in text.splitlines() if "Hadamard" in line)
    learn = next(line for line in text.splitlines() if "learned" in line)
    quip = next(line for line in text.splitlines() if "QuIP" in line)
    assert "| met (" in had and "draws 2/2" in had
    assert "**not met**" in learn and "ahead of peer's best: no" in learn and "draws 1/2" in learn
    assert "peer's best" in quip and "| 0,1 |" in quip


def test_formats_option():
    assert peer.parse_args([]).formats == ["int", "nvfp4", "mxfp4"]
    assert peer.parse_args(["--formats", "mxfp4,int"]).formats == ["mxfp4", "int"]
    assert peer.parse_args(["--formats", "none"]).formats == []
    with pytest.raises(SystemExit):
        peer.parse_args(["--formats", "fp8"])
