"""Benchmarks you can rerun (`sip bench shard`, `make bench`): the stage against the bare
library doing the same work, in the same run, on the same machine."""

from __future__ import annotations

import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

from pipeline.manifest import Manifest, parse_manifest
from pipeline.tokenizer import load_tokenizer
from stages.shard import corpus_files, plan_shard, run_shard

_BATCH = 64


def _bare_tokenize(args: tuple[str, list[str]]) -> int:
    tok_dir, texts = args
    tok = load_tokenizer(tok_dir)
    tokens = 0
    for i in range(0, len(texts), _BATCH):
        tokens += sum(len(e.ids) for e in tok.encode_batch(texts[i : i + _BATCH], add_special_tokens=False))
    return tokens


def _texts(manifest: Manifest) -> list[str]:
    from pipeline.corpus import CorpusReader

    files = corpus_files(manifest)
    reader = CorpusReader(files, text_key=manifest.corpus.text_key, id_key=manifest.corpus.id_key)
    return [doc.text for doc in reader.run(None, 0, 1)]


def bench_shard(manifest: Manifest, processes: int = 2, repeats: int = 3) -> dict:
    """Shard throughput vs bare batch tokenization of the same documents, same process count.

    The bare baseline gets the documents already in memory and does nothing but
    ``encode_batch`` in ``processes`` worker processes; the stage also reads and parses the
    corpus, draws split points, builds rows and writes Parquet. Best of ``repeats`` each.
    """
    texts = _texts(manifest)
    tok_dir = str(plan_shard(manifest).tokenizer_dir)
    chunks = [texts[i::processes] for i in range(processes)]

    bare_s, tokens = float("inf"), 0
    for _ in range(repeats):
        started = time.perf_counter()
        with mp.get_context("fork").Pool(processes) as pool:
            tokens = sum(pool.map(_bare_tokenize, [(tok_dir, c) for c in chunks]))
        bare_s = min(bare_s, time.perf_counter() - started)

    sip_s, card = float("inf"), {}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            data = manifest.model_dump(mode="json")
            data["run"]["output_dir"] = str(Path(tmp) / "out")
            data["executor"] = {"type": "local", "tasks": processes, "workers": processes}
            m = parse_manifest(data)
            m._source = manifest.source
            started = time.perf_counter()
            card = run_shard(m, log=lambda _m: None)
            sip_s = min(sip_s, time.perf_counter() - started)

    docs = len(texts)
    return {
        "documents": docs,
        "tokens": tokens,
        "processes": processes,
        "bare_tokenize": {"seconds": round(bare_s, 3), "documents_per_s": round(docs / bare_s, 1),
                          "tokens_per_s": round(tokens / bare_s, 1)},
        "sip_shard": {"seconds": round(sip_s, 3), "documents_per_s": round(docs / sip_s, 1),
                      "tokens_per_s": round(tokens / sip_s, 1), "pairs": card.get("rows")},
        "ratio_sip_over_bare": round(bare_s / sip_s, 3),
    }


if __name__ == "__main__":  # pragma: no cover - convenience for `python -m stages.bench`
    from pipeline.manifest import load_manifest

    print(json.dumps(bench_shard(load_manifest("manifests/demo.yaml", ["corpus.limit=null"])), indent=1))
