"""A draft made by `localcoder distill --preset draft` (issue 15, part B) changes no output token: a few of the
packaged 0.5B's blocks, distilled on real code to the served model's next-token distribution, exported to GGUF
by `localcoder quantize` and registered, then named as ``draft_model`` of that served model. Its greedy output
equals the output without speculation, the draft is consulted, and rejected drafts leave no KV cells behind.

The preset's target is the packaged 1.5B; the tests have only the 0.5B, so here the 0.5B is both the teacher
(the model the draft learns) and the served target, which is what the preset does for the 1.5B."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest
from test_llama_slots import assert_same_greedy
from test_speculative_real import FIM, MAX_TOKENS, REPETITIVE, assert_slot_consistent, generate

from localcoder.cli import main as cli_main
from localcoder.completion import Completer, InfillRequest
from localcoder.config import ModelConfig
from localcoder.engines.speculative import DraftModel

pytestmark = pytest.mark.integration

MODEL = "qwen2.5-coder-0.5b"
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def draft_name(model_05b_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("draft")
    with pytest.MonkeyPatch.context() as mp:  # undone even when the run fails
        mp.setenv("XDG_DATA_HOME", str(tmp / "data"))  # a private registry; the packaged models stay where they are
        yield make_draft(tmp)


def make_draft(tmp: Path) -> str:
    """The draft preset, shortened to a few steps on a slice of the standard library, then q8_0 GGUF."""
    from localcoder import models

    corpus = tmp / "corpus"
    corpus.mkdir()
    for m in ("textwrap", "shlex", "bisect", "heapq", "colorsys", "fnmatch", "glob", "keyword"):
        shutil.copy(STDLIB / f"{m}.py", corpus)
    config = tmp / "draft.toml"
    config.write_text("export_gguf = []\n")  # the preset's gated q4_k_m export runs ~60 cases: made below instead
    out = tmp / "draft-run"
    rc = cli_main(["distill", "--preset", "draft", "--config", str(config), "--teacher", MODEL,
                   "--student-layers", "4", "--data", str(corpus), "--out", str(out), "--steps", "3",
                   "--seq-len", "128", "--batch-size", "2", "--train-rows", "16", "--val-rows", "2",
                   "--val-every", "3", "--ckpt-every", "3", "--max-minutes", "0", "--cache-dir", str(tmp / "cache"),
                   "--quiet"])
    assert rc == 0, "the draft preset's run failed"
    prov = json.loads((out / "model" / "localcoder.json").read_text())
    assert prov["teacher"] == MODEL and len(prov["student_init"]["layers_kept"]) == 4
    assert cli_main(["quantize", str(out / "model"), "--to", "gguf", "--type", "q8_0", "--out",
                     str(tmp / "it-draft.gguf"), "--name", "it-draft", "--no-gate", "--quiet"]) == 0
    assert models.resolve("it-draft").kind == "gguf"
    return "it-draft"


@pytest.fixture(scope="module")
def engines(draft_name):
    from localcoder import models
    from localcoder.engines.llamacpp import LlamaCppEngine

    # the served default (gguf_type auto) with and without the distilled draft
    engs = {s: LlamaCppEngine.from_config(models.resolve(MODEL), ModelConfig(
        model=MODEL, ctx=1024, threads=2, speculation=s, draft_model=draft_name if s == "draft" else ""))
        for s in ("off", "draft")}
    yield engs
    for e in engs.values():
        e.close()


@pytest.mark.parametrize("name", ["repetitive", "fib", "stack"])
def test_a_distilled_draft_leaves_the_greedy_output_unchanged(engines, name):
    plain, drafted = engines["off"], engines["draft"]
    assert isinstance(drafted.drafter, DraftModel)
    draft = drafted.drafter.engine
    assert draft.model_name == "it-draft" and draft._lib.llama_model_n_layer(draft.model.model) == 4
    c = Completer(plain)
    prompt = plain.tokenizer.tokenize(REPETITIVE) if name == "repetitive" else c.prompt(InfillRequest(*FIM[name]))[0]
    plain.reset_cache()
    want, _ = generate(plain, prompt)
    drafted.reset_cache()
    draft.reset_cache()
    got, t = generate(drafted, prompt)
    assert_same_greedy(got, want, prompt, plain, c.format.stop_ids(plain.tokenizer), MAX_TOKENS)
    assert_slot_consistent(drafted)  # rejected drafts rolled out of the target's KV cache
    assert t.draft_n > 0 and t.draft_accepted_n <= t.draft_n and t.target_forwards <= t.predicted_n
