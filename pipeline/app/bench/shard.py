"""`sip bench shard` (`make bench`): the shard stage against bare batch tokenization of the
same documents, in the same run, on the same machine."""

from __future__ import annotations

import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

from pipeline.app.registry import run_stages
from pipeline.manifest import Manifest, parse_manifest
from pipeline.tokenizer import load_tokenizer
from stages.shard import corpus_files, plan_shard

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


def bench_shard(manifest: Manifest, processes: int = 2, repeats: int = 3, copies: int = 1) -> dict:
    """Shard throughput vs bare batch tokenization of the same documents, same process count.

    The bare baseline gets the documents already in memory and does nothing but
    ``encode_batch`` in ``processes`` worker processes; the stage also reads and parses the
    corpus, starts its worker processes, draws split points, builds rows and writes Parquet.
    ``copies`` > 1 repeats the corpus (new ids) to see the steady state past the fixed
    start-up cost. Best of ``repeats`` each.
    """
    with tempfile.TemporaryDirectory() as corpus_tmp:
        if copies > 1:
            manifest = _replicated(manifest, copies, Path(corpus_tmp))
        return _bench_shard(manifest, processes, repeats)


def _replicated(manifest: Manifest, copies: int, directory: Path) -> Manifest:
    from pipeline.corpus import CorpusReader

    docs = list(CorpusReader(corpus_files(manifest), text_key=manifest.corpus.text_key,
                             id_key=manifest.corpus.id_key).run(None, 0, 1))
    parts = 16
    handles = [open(directory / f"part-{i:03d}.jsonl", "w") for i in range(parts)]
    for copy in range(copies):
        for k, doc in enumerate(docs):
            handles[(copy * len(docs) + k) % parts].write(json.dumps({"id": f"{doc.id}#{copy}", "text": doc.text}) + "\n")
    for h in handles:
        h.close()
    data = manifest.absolute_data()
    data["corpus"] = {"paths": [str(directory / "*.jsonl")], "text_key": "text", "id_key": "id"}
    return parse_manifest(data)


def _bench_shard(manifest: Manifest, processes: int, repeats: int) -> dict:
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
            data = manifest.absolute_data()
            data["run"]["output_dir"] = str(Path(tmp) / "out")
            data["executor"] = {"type": "local", "tasks": processes, "workers": processes}
            m = parse_manifest(data)
            started = time.perf_counter()
            card = run_stages(m, ["shard"], log=lambda _m: None)["shard"]
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
