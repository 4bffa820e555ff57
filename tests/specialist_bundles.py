"""Specialist bundles for the tests and docs/measure_specialists_serving.py, made the way a distill run makes
them (``localcoder.specialists``: TF-IDF over code terms, spherical k-means, ``write_bundle``), from two small
corpora, Python and JavaScript, so that the router has two clearly different centroids."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from localcoder.specialists import TfidfEmbedder, kmeans, write_bundle

PYTHON = [
    "import os\n\ndef read_lines(path):\n    with open(path) as fh:\n        return [line.rstrip() for line in fh]\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        self.items.append(item)\n",
    "def average(self, numbers):\n    if not numbers:\n        return None\n    return sum(numbers) / len(numbers)\n",
    "import json\n\ndef load(path):\n    with open(path) as fh:\n        return json.load(fh)\n",
    "for key, value in sorted(counts.items()):\n    print(f\"{key}: {value}\")\n",
    "def is_prime(n):\n    if n < 2:\n        return False\n    return all(n % d for d in range(2, int(n ** 0.5) + 1))\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n    def __repr__(self):\n        return f\"Point({self.x}, {self.y})\"\n",
    "def main():\n    args = parse_args()\n    for path in args.paths:\n        print(path, len(read_lines(path)))\n\nif __name__ == \"__main__\":\n    main()\n",
]

JAVASCRIPT = [
    "const fs = require('fs');\n\nfunction readConfig(file) {\n  return JSON.parse(fs.readFileSync(file, 'utf8'));\n}\n",
    "export class EventBus {\n  constructor() {\n    this.handlers = {};\n  }\n  on(name, fn) {\n    (this.handlers[name] ||= []).push(fn);\n  }\n}\n",
    "function sumPrices(items) {\n  return items.reduce((acc, item) => acc + item.price, 0);\n}\n",
    "const fetchUser = async (id) => {\n  const response = await fetch(`/api/users/${id}`);\n  return response.json();\n};\n",
    "document.querySelectorAll('button').forEach((el) => {\n  el.addEventListener('click', () => console.log(el.id));\n});\n",
    "export function debounce(fn, ms) {\n  let timer = null;\n  return (...args) => {\n    clearTimeout(timer);\n    timer = setTimeout(() => fn(...args), ms);\n  };\n}\n",
    "const router = express.Router();\nrouter.get('/', (req, res) => res.send('ok'));\nmodule.exports = router;\n",
    "let total = 0;\nfor (const item of cart.items) {\n  total += item.price * item.count;\n}\nconsole.log(`total: ${total}`);\n",
]


def make_bundle(root: Path, adapters: Sequence[Path | bytes], *, base: dict | None = None,
                corpora: Sequence[Sequence[str]] = (PYTHON, JAVASCRIPT), names: Sequence[str] = ("python", "javascript"),
                ) -> Path:
    """A bundle under ``root`` whose specialist j (named ``names[j]``) has corpus j's cluster as its centroid and
    ``adapters[j]`` (a file, copied, or bytes) as its adapter; fails when k-means does not separate the corpora."""
    texts = [t for c in corpora for t in c]
    embedder = TfidfEmbedder.fit(texts)
    labels, centroids = kmeans(embedder.embed(texts), len(corpora), seed=0)
    order, start = [], 0
    for corpus in corpora:
        own = labels[start: start + len(corpus)]
        start += len(corpus)
        assert len(set(own.tolist())) == 1, f"k-means split a corpus: {labels.tolist()}"
        order.append(int(own[0]))
    assert len(set(order)) == len(corpora), f"k-means merged corpora: {labels.tolist()}"
    specs = []
    for j, (name, adapter) in enumerate(zip(names, adapters)):
        dest = root / f"specialist-{j}" / "adapter.gguf"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(adapter, bytes):
            dest.write_bytes(adapter)
        else:
            shutil.copyfile(adapter, dest)
        specs.append({"name": name, "adapter": f"specialist-{j}/adapter.gguf", "peft": f"specialist-{j}/peft",
                      "rows": len(corpora[j]), "top_paths": [f"{name}/example"]})
    write_bundle(root, base=base or {"name": "qwen2.5-coder-0.5b"}, embedder=embedder, centroids=centroids[order],
                 specialists=specs, provenance={"made_by": "tests/specialist_bundles.py"})
    return root


def scaled_lora(src: Path, dest: Path, scale: float) -> Path:
    """A copy of the GGUF LoRA ``src`` with every ``lora_b`` tensor times ``scale``: another adapter of the same
    base and shapes (what llama.cpp loads), computing something else."""
    from gguf import GGUFReader

    shutil.copyfile(src, dest)
    reader = GGUFReader(dest, "r+")
    scaled = 0
    for t in reader.tensors:
        if t.name.endswith(".lora_b"):
            t.data[...] = (t.data.astype(np.float32) * scale).astype(t.data.dtype)
            scaled += 1
    assert scaled, f"{src} has no lora_b tensors"
    reader.data.flush()
    del reader
    return dest
