"""`sip judge-compare`: what each comparison scheme costs and how often it picks the same DPO
pair as all-pairs in both orders, on the manifest's own judge and candidates.

For each of up to ``limit`` pairs with at least three candidates (the judge stage's candidates:
original, rewrite, rollouts), every candidate is compared with every other in both shown
orders: the full matrix of the judge's outcomes (K(K-1) calls a pair). Every scheme
(``stages/schemes.py``) is then replayed on that matrix: a comparison a scheme makes gets the
outcome the judge gave that shown pair. This is exact for a deterministic judge (``choice_prob``,
or ``verdict`` at temperature 0); a sampled verdict is replayed from its one judgment.

Measured per scheme, against all-pairs in both orders (the paper's), averaged over pairs and
over ``seeds`` draws of the scheme's seed: agreement of the chosen candidate, of the rejected
one and of the (chosen, rejected) pair; Kendall's tau-b of the quality scores; judge calls and
prompt tokens per pair. The **noise ceiling** is how often two all-pairs runs with one shown
order each (orders drawn from different seeds) agree on the DPO pair: what a second run of
the same judge reproduces. A scheme's quality is its pair agreement over that ceiling.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.engines.factory import make_engine
from pipeline.errors import SipError
from pipeline.io import table_units
from pipeline.manifest import Manifest, ManifestError
from stages.criteria import manifest_judge
from stages.judge import PAIR_COLUMNS, plan_judge
from stages.schemes import SCHEMES, Draws, drive, run_scheme
from stages.scoring import CandidateSet, Ranked, pick


@dataclass(frozen=True)
class Variant:
    """A scheme as a row of the report."""

    scheme: str
    both: bool
    degree: int = 4

    @property
    def name(self) -> str:
        degree = f", d={self.degree}" if self.scheme in ("sparse_bt", "adaptive") else ""
        return f"{self.scheme} ({'both orders' if self.both else 'one order'}{degree})"


def variants(degree: int) -> list[Variant]:
    out = [Variant(s, both, degree) for s in SCHEMES if s != "sparse_bt" for both in (True, False)]
    out += [Variant("sparse_bt", True, degree), Variant("sparse_bt", False, degree), Variant("sparse_bt", False, 2 * degree)]
    return out


def kendall_tau_b(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b of two score lists (ties in either count as in scipy's tau-b)."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
    return (concordant - discordant) / denominator if denominator else None


def dpo_pair(candidates, scores: list[float | None]) -> tuple[str, str] | None:
    """(chosen, rejected) cand ids by quality, as the prefs stage picks them (ties by source, id)."""
    picked = pick([Ranked(c.cand_id, c.source, s, c.cand_id) for c, s in zip(candidates, scores) if s is not None], 0.0)
    return (picked.chosen, picked.rejected) if picked.status == "usable" else None


def candidate_sets(manifest: Manifest, limit: int) -> tuple[list[CandidateSet], int]:
    """Up to ``limit`` pairs' candidates (three or more), first by pair id, and how many pairs
    were looked at."""
    plan = plan_judge(manifest)
    upstream = plan.upstream()
    units = table_units(plan.pairs_dir)
    order = sorted((pair_id, i) for i, unit in enumerate(units)
                   for pair_id in unit.read(["pair_id"]).column("pair_id").to_pylist())
    rows: dict[int, dict[str, dict]] = {}  # unit index -> its pairs by id, read when first needed
    sets, seen = [], 0
    for pair_id, i in order:
        seen += 1
        if i not in rows:
            rows[i] = {p["pair_id"]: p for p in units[i].read(PAIR_COLUMNS).to_pylist()}
        candidate_set = upstream.for_pair(rows[i][pair_id], units[i].key)
        if len(candidate_set.candidates) >= 3:
            sets.append(candidate_set)
            if len(sets) == limit:
                break
    return sets, seen


def run_judge_compare(manifest: Manifest, limit: int = 40, seeds: int = 5,
                      log: Callable[[str], None] = print) -> dict:
    """The report (see the module docstring).

    Raises:
        ManifestError: the quality criterion is not pairwise (``likelihood`` or unset).
        StageFailed: the judge stage's upstream tables are not complete.
    """
    quality = manifest.judging.quality
    if quality is None or quality.mode not in ("verdict", "choice_prob"):
        raise ManifestError("judge-compare: judging.quality.mode must be pairwise (choice_prob or verdict), not "
                            f"{quality.mode if quality else 'unset'}; e.g. --set judging.quality.mode=choice_prob")
    sets, seen = candidate_sets(manifest, limit)
    if not sets:
        raise SipError(f"judge-compare: none of the {seen} pairs has three or more candidates (raise rollouts.count)")
    log(f"judge-compare: {len(sets)} pairs with 3+ candidates (of {seen} looked at), "
        f"{sum(len(s.candidates) for s in sets)} candidates; judging every ordered comparison")
    engine = make_engine(manifest, manifest.judge, "judge")
    try:
        matrix, tokens, seconds = judge_matrix(manifest, engine, sets)
    finally:
        engine.close()

    reference = [replay(s, matrix[k], Variant("all_pairs", True), 0) for k, s in enumerate(sets)]
    rows = []
    for variant in variants(quality.degree):
        rows.append(score_variant(variant, sets, matrix, tokens, reference, seeds))
    ceiling = noise_ceiling(sets, matrix, seeds)
    for row in rows:
        row["quality_vs_ceiling"] = round(row["pair_agreement"] / ceiling, 3) if ceiling else None
    return {
        "pairs": len(sets), "pairs_looked_at": seen, "seeds": seeds,
        "candidates_per_pair": round(sum(len(s.candidates) for s in sets) / len(sets), 2),
        "mode": quality.mode, "judge": manifest.judge.model, "noise_ceiling": round(ceiling, 3),
        "matrix_calls": sum(len(m) for m in matrix), "matrix_s": round(seconds, 1),
        "unparsable": sum(v is None for m in matrix for v in m.values()),
        "schemes": rows,
    }


def judge_matrix(manifest: Manifest, engine, sets: list[CandidateSet]):
    """Every ordered comparison of every pair, judged once: per pair {(a, b): P(a better)} and
    {(a, b): prompt tokens} (None where the judge's tokenizer is not local)."""
    judge = manifest_judge(manifest, engine)
    requests, keys = [], []
    for k, s in enumerate(sets):
        for a in range(len(s.candidates)):
            for b in range(len(s.candidates)):
                if a != b:
                    keys.append((k, a, b))
                    requests.append(judge.quality_request(f"m{len(requests)}", s.prefix, s.candidates[a].text,
                                                          s.candidates[b].text))
    started = time.perf_counter()
    scored = judge.judge_shown(requests)
    seconds = time.perf_counter() - started
    matrix: list[dict] = [{} for _ in sets]
    tokens: list[dict] = [{} for _ in sets]
    local = engine.tokenizer is not None
    for (k, a, b), request, result in zip(keys, requests, scored):
        matrix[k][(a, b)] = result.score
        tokens[k][(a, b)] = len(engine.prompt_ids(request)) if local else None
    return matrix, tokens, seconds


def replay(candidate_set: CandidateSet, outcomes: dict, variant: Variant, seed: int):
    texts = tuple(c.text for c in candidate_set.candidates)
    run = run_scheme(variant.scheme, len(texts), Draws(seed, candidate_set.pair_id, texts), variant.both, variant.degree)
    scores, made = drive(run, lambda comparisons: [outcomes[c] for c in comparisons])
    return scores, made, dpo_pair(candidate_set.candidates, scores)


def score_variant(variant: Variant, sets, matrix, tokens, reference, seeds: int) -> dict:
    chosen = rejected = both = runs = 0
    taus, calls, prompt_tokens = [], 0, 0
    for seed in range(seeds):
        for k, s in enumerate(sets):
            scores, made, picked = replay(s, matrix[k], variant, seed)
            ref_scores, _, ref_pick = reference[k]
            runs += 1
            calls += len(made)
            prompt_tokens += sum(tokens[k][c] or 0 for c in made)
            if picked is not None and ref_pick is not None:
                chosen += picked[0] == ref_pick[0]
                rejected += picked[1] == ref_pick[1]
                both += picked == ref_pick
            elif picked is None and ref_pick is None:
                chosen += 1
                rejected += 1
                both += 1
            common = [i for i, (x, y) in enumerate(zip(scores, ref_scores)) if x is not None and y is not None]
            tau = kendall_tau_b([scores[i] for i in common], [ref_scores[i] for i in common])
            if tau is not None:
                taus.append(tau)
    reference_calls = sum(len(m) for m in matrix)
    return {
        "scheme": variant.scheme, "orders": "both" if variant.both else "one", "degree": variant.degree,
        "name": variant.name, "calls_per_pair": round(calls / runs, 2),
        "calls_saving": round(reference_calls * seeds / calls, 2) if calls else None,
        "prompt_tokens_per_pair": round(prompt_tokens / runs, 1),
        "chosen_agreement": round(chosen / runs, 3), "rejected_agreement": round(rejected / runs, 3),
        "pair_agreement": round(both / runs, 3), "kendall_tau": round(sum(taus) / len(taus), 3) if taus else None,
    }


def noise_ceiling(sets, matrix, seeds: int) -> float:
    """How often two all-pairs runs with one shown order each (orders from different seeds)
    pick the same DPO pair, over ``seeds`` pairs of seeds."""
    agree = runs = 0
    one = Variant("all_pairs", False)
    for seed in range(seeds):
        for k, s in enumerate(sets):
            first = replay(s, matrix[k], one, 2 * seed + 1)[2]
            second = replay(s, matrix[k], one, 2 * seed + 2)[2]
            agree += first == second
            runs += 1
    return agree / runs if runs else 0.0


def format_table(report: dict) -> str:
    lines = [
        f"judge-compare: {report['pairs']} pairs, {report['candidates_per_pair']} candidates a pair, "
        f"judge {report['judge']} ({report['mode']}); {report['matrix_calls']:,} calls judged every ordered "
        f"comparison in {report['matrix_s']} s ({report['unparsable']} unparsable); {report['seeds']} seeds",
        f"noise ceiling (two one-order all-pairs runs pick the same DPO pair): {report['noise_ceiling']:.3f}",
        "",
        "| scheme | calls/pair | saving | prompt tokens/pair | chosen | rejected | DPO pair | / ceiling | tau |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["schemes"]:
        ratio = f"{r['quality_vs_ceiling']:.2f}" if r["quality_vs_ceiling"] is not None else "-"
        tau = f"{r['kendall_tau']:.2f}" if r["kendall_tau"] is not None else "-"
        lines.append(f"| {r['name']} | {r['calls_per_pair']} | x{r['calls_saving']} | {r['prompt_tokens_per_pair']:,.0f} | "
                     f"{r['chosen_agreement']:.3f} | {r['rejected_agreement']:.3f} | {r['pair_agreement']:.3f} | "
                     f"{ratio} | {tau} |")
    return "\n".join(lines)


def write_report(report: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path
