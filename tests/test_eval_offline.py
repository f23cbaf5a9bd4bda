"""The offline explanation metric: ROUGE-L by bit-parallel LCS, MiniLM embeddings, trust."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from icm.cli.main import app
from icm.evaluation.meq import MEQItem, judgement_pairs, read_judgements_dir
from icm.evaluation.meq_judge import ExplanationPair
from icm.evaluation.meq_offline import correlations, lcs_length, load_embedder, rouge_l, score_pairs, spearman

runner = CliRunner()


def _lcs_dp(a, b) -> int:
    m = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            m[i + 1][j + 1] = m[i][j] + 1 if x == y else max(m[i][j + 1], m[i + 1][j])
    return m[-1][-1]


def test_bit_parallel_lcs_matches_dynamic_programming():
    rng = random.Random(7)
    for _ in range(500):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 70))]  # past 64 tokens: more than one machine word
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 70))]
        assert lcs_length(a, b) == _lcs_dp(a, b)


def test_rouge_l():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("", "anything") == 0.0 and rouge_l("dogs bark", "cats meow") == 0.0
    # LCS "the cat on mat" = 4 of 6 candidate and 4 of 5 reference tokens
    assert rouge_l("The cat, sat on the mat!", "the cat lay on mat") == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))


def test_rouge_l_gives_the_reference_implementations_figures_on_the_seed_explanations(seed_dir):
    """Google's rouge-score, given our tokens, agrees on all 190 of the paper's pairs; with
    its own tokeniser ("person's" -> "person", "s") the figures move, which is why ours stays."""
    from rouge_score import rouge_scorer

    from icm.evaluation.meq_offline import tokens

    class Ours:
        def tokenize(self, text):
            return tokens(text)

    pairs = judgement_pairs(read_judgements_dir(seed_dir / "eval" / "meq" / "judgements"))
    assert len(pairs) == 190
    reference = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Ours())
    for p in pairs:
        assert rouge_l(p.candidate, p.reference) == pytest.approx(reference.score(p.reference, p.candidate)["rougeL"].fmeasure, abs=1e-12)
    default = rouge_scorer.RougeScorer(["rougeL"])
    differ = sum(rouge_l(p.candidate, p.reference) != pytest.approx(default.score(p.reference, p.candidate)["rougeL"].fmeasure, abs=1e-12)
                 for p in pairs)
    assert differ > 100


def test_lexical_metric_needs_no_model():
    pairs = [ExplanationPair("a", "A woman in a bikini on a beach.", "A woman in a bikini at the beach."),
             ExplanationPair("b", "A woman in a bikini on a beach.", "Stock prices fell sharply today.")]
    s = score_pairs(pairs, metric="lexical")
    assert s[0].embedding is None and s[0].score > 50 > s[1].score == 0.0


def test_embedding_metric_ranks_paraphrases_above_unrelated_text():
    ref = "The woman wears a low-cut top that shows her cleavage, a pose meant to look seductive."
    pairs = [
        ExplanationPair("para", ref, "She is dressed in a revealing neckline exposing her chest and poses provocatively."),
        ExplanationPair("same-words", ref, "The top she wears is low and the woman looks at a seductive pose that shows."),
        ExplanationPair("unrelated", ref, "A bowl of fruit stands on a wooden kitchen table next to a window."),
    ]
    s = {p.id: x for p, x in zip(pairs, score_pairs(pairs, metric="combined"), strict=True)}
    assert s["para"].embedding > s["unrelated"].embedding + 0.2
    assert s["para"].score > s["unrelated"].score
    assert all(0 <= x.score <= 100 for x in s.values())
    hits = load_embedder.cache_info().hits
    score_pairs(pairs, metric="embedding")  # cached: the model is not loaded again, the texts not re-encoded
    assert load_embedder.cache_info().misses == 1 and load_embedder.cache_info().hits >= hits


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40])[0] == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1])[0] == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) == (None, None)


def test_offline_metric_agrees_with_gpt4o_on_a_sample_of_the_seed_judgements(seed_dir):
    """Every 4th of the paper's GPT-4o judgements (48): the offline score ranks them in the same direction.

    bench/meq_offline.py gives the figure over all 190."""
    js = read_judgements_dir(seed_dir / "eval" / "meq" / "judgements")[::4]
    pairs = judgement_pairs(js)
    assert len(pairs) == len(js) == 48
    scores = dict(zip((p.id for p in pairs), score_pairs(pairs), strict=True))
    items = [MEQItem(id=j.id, scores=j.scores, offline=scores[j.id]) for j in js]
    corr = {(c.measure, c.criterion): c for c in correlations(items)}
    acc = corr[("offline", "accuracy")]
    assert acc.n == 48 and acc.spearman > 0.3 and acc.p_value < 0.01
    assert corr[("embedding", "accuracy")].spearman > 0.3


def test_cli_offline_without_judge(tmp_path):
    ref, cand = tmp_path / "ref.txt", tmp_path / "cand.jsonl"
    ref.write_text("a_1.jpg\nA man shows his bare muscular torso at the gym.\nb_2.jpg\nA child plays with a red ball in a park.\n")
    cand.write_text(json.dumps({"path": "/x/a_1.jpg", "explanation": "A shirtless muscular man poses in a gym."}) + "\n"
                    + json.dumps({"path": "/x/b_2.jpg", "explanation": "Two cars are parked in the street."}) + "\n")
    r = runner.invoke(app, ["eval", "meq", "--reference", str(ref), "--candidate", str(cand), "--offline-metric", "lexical", "--json"])
    assert r.exit_code == 0, r.output
    meq = json.loads(r.stdout)["meq"]
    assert meq["mode"] == "offline" and meq["means"] == {} and meq["offline"]["metric"] == "ROUGE-L F1"
    items = {i["id"]: i for i in meq["items"]}
    assert items["a_1"]["offline"]["score"] > items["b_2"]["offline"]["score"]
    r = runner.invoke(app, ["eval", "meq", "--reference", str(ref), "--candidate", str(cand), "--no-offline"])
    assert r.exit_code == 2 and "only the offline metric" in r.output
