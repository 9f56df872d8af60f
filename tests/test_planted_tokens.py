"""The planted-token study (`studies/planted_tokens.py`, `studies/planted_variants.py`): the variants plant exactly
the span they say, the measures are right on numbers whose answer is known, OT moves a span's share the way its
costs say, and the study runs end to end on a tiny model and re-renders from its JSON."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from otpo_trl.data import load_preference_dataset
from otpo_trl.inspection import pair_token_stats
from otpo_trl.loading import load_model_and_tokenizer
from otpo_trl.ot import ot_token_weights
from otpo_trl.tokenization import tokenize_pair
from studies import planted_tokens, planted_variants
from studies.planted_variants import (
    build_variants,
    make_variant,
    shifted_digits,
    span_positions,
    swap_fact,
    trim_answer,
)


PROMPT = [{"role": "user", "content": "Tell me about the capital."}]
CHOSEN = "The capital of France is Paris. It has 2148 thousand people. Its river is the Seine. It is old."
REJECTED = "Paris is a city. It is in Europe. Many people live there."


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def differing(a: list[int], b: list[int]) -> list[int]:
    """The positions of `b` outside the longest common prefix and suffix of token lists `a` and `b`."""
    start = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    end = 0
    while end < min(len(a), len(b)) - start and a[len(a) - 1 - end] == b[len(b) - 1 - end]:
        end += 1
    return list(range(start, len(b) - end))


# ------------------------------------------------------------------ the variants


def test_number_and_entity_rules():
    assert shifted_digits("1896") == "6341" and shifted_digits("50") == "95" and shifted_digits("0.5") == "5.0"
    text, old, new, said = swap_fact("Steps:\n1. Boil 30 eggs.\n2. Eat.\nConfidence: 90%")
    assert said == "30 -> 85" and text == "Steps:\n1. Boil 85 eggs.\n2. Eat.\nConfidence: 90%"  # not 1., not 90
    assert swap_fact("I met her in Paris on a Monday.")[3] == "Paris -> Berlin"
    assert swap_fact("Confidence: 90%") is None and swap_fact("No fact here.") is None


def test_trim_cuts_after_a_sentence_end_within_the_budget(tokenizer):
    long = " ".join(f"Sentence number {w} is here." for w in ("one", "two", "three", "four", "five", "six"))
    cut = trim_answer(long, tokenizer, 20)
    assert cut.endswith("here.") and long.startswith(cut) and len(cut) < len(long)
    assert len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= 20
    assert trim_answer(CHOSEN + "  ", tokenizer, 1000) == CHOSEN
    assert trim_answer("no end at all " * 20, tokenizer, 10) is None


@pytest.mark.parametrize("kind", planted_variants.KINDS)
def test_each_variant_plants_exactly_its_span(kind, tokenizer):
    variant = make_variant(kind, 0, PROMPT, CHOSEN, REJECTED)
    base = {"chosen": CHOSEN, "rejected": REJECTED}  # swap: each side's unplanted text is the other side's
    if kind == "swap":
        base = {s: variant.example[o][0]["content"] for s, o in (("chosen", "rejected"), ("rejected", "chosen"))}
    planted = {
        "filler": {"rejected": "\n\n" + planted_variants.FILLERS[0]},
        "insert": {"chosen": " " + planted_variants.IRRELEVANT[0]},
        "swap": {"chosen": "2148", "rejected": "7693"},
    }[kind]
    assert set(variant.spans) == set(planted)
    unplanted = {"prompt": PROMPT, **{s: [{"role": "assistant", "content": base[s]}] for s in base}}
    for side, (start, end) in variant.spans.items():
        text = variant.example[side][0]["content"]
        assert text[start:end] == planted[side]
        if kind != "swap":  # the text around the span is the original answer's
            assert text[:start] + text[end:] == base[side]
        # The positions are the tokens that differ from the unplanted answer (common prefix and suffix kept), and
        # their characters (the tokenizer's offsets) cover the planted text and nothing of the rest but spaces.
        positions = span_positions(variant.example, side, (start, end), tokenizer)
        ids = tokenize_pair(variant.example, tokenizer)[f"{side}_ids"]
        before = tokenize_pair({**unplanted, side: [{"role": "assistant", "content": base[side]}]}, tokenizer)
        assert positions == differing(before[f"{side}_ids"], ids)
        assert tokenizer.decode(ids[positions[0] : positions[-1] + 1]).strip() == planted[side].strip()
    if kind == "swap":  # the answers differ only at the span, and the chosen one is the original
        c, r = (variant.example[s][0]["content"] for s in ("chosen", "rejected"))
        assert c == CHOSEN and r == CHOSEN.replace("2148", "7693")


def test_span_positions_refuses_text_that_does_not_tokenise_as_the_trainer(tokenizer, monkeypatch):
    variant = make_variant("filler", 0, PROMPT, CHOSEN, REJECTED)
    original = tokenizer.apply_chat_template

    def other_text(*args, **kwargs):  # the text differs from the one the trainer's ids come from
        out = original(*args, **kwargs)
        return out + " " if kwargs.get("tokenize") is False else out

    monkeypatch.setattr(tokenizer, "apply_chat_template", other_text)
    with pytest.raises(ValueError, match="does not tokenise to the trainer's rejected tokens"):
        span_positions(variant.example, "rejected", variant.spans["rejected"], tokenizer)


# ------------------------------------------------------------------ the measures


def test_share_ratio_and_auroc_on_known_numbers():
    w, group = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([False, False, True, True])
    assert planted_tokens.group_measures(w, group) == pytest.approx((7 / 10 / 0.5, 1.0))
    assert planted_tokens.group_measures(w, ~group) == pytest.approx((3 / 10 / 0.5, 0.0))
    # one tie among three comparisons: 1/3 greater + (1/3) / 2
    ratio, auroc = planted_tokens.group_measures(torch.tensor([1.0, 2.0, 2.0, 4.0]), torch.tensor([0, 1, 0, 0]).bool())
    assert (ratio, auroc) == pytest.approx((2 / 9 / 0.25, 1 / 3 + 1 / 6))
    assert planted_tokens.group_measures(torch.full((5,), 0.3), torch.tensor([1, 1, 0, 0, 0]).bool()) == (1.0, 0.5)
    nan = planted_tokens.group_measures(w, torch.ones(4, dtype=torch.bool))  # nothing to compare with
    assert all(x != x for x in nan)
    masks = planted_tokens.group_masks([2, 3], 6)
    assert [masks[g].tolist() for g in planted_tokens.GROUPS] == [
        [True, True, False, False, False, False],
        [False, False, True, True, False, False],
        [False, False, False, False, True, True],
    ]


def test_verdict_needs_both_intervals_and_more_than_rounding():
    def cell(ratio, auroc):  # intervals of width 0.02 around the means
        return {
            m: {"mean": v, "low": v - 0.01, "high": v + 0.01} for m, v in (("share_ratio", ratio), ("auroc", auroc))
        }

    assert planted_tokens.verdict(cell(1.2, 0.7)) == "singled out"
    assert planted_tokens.verdict(cell(0.8, 0.3)) == "discounted"
    assert planted_tokens.verdict(cell(1.2, 0.5)) == planted_tokens.verdict(cell(0.8, 0.7)) == "neither"
    # 200 SamPO draws of a side it keeps whole average to 1 + 2e-16, not to a finding
    rounding = {
        m: dict.fromkeys(("mean", "low", "high"), v + 2e-16) for m, v in (("share_ratio", 1.0), ("auroc", 0.5))
    }
    assert planted_tokens.verdict(rounding) == "neither"


def test_bootstrap_mean_of_known_values():
    index = torch.randint(0, 4, (500, 4), generator=torch.Generator().manual_seed(0)).numpy()
    out = planted_tokens.bootstrap_mean([1.0, 2.0, float("nan"), 3.0], index)
    assert out["mean"] == pytest.approx(2.0) and 1.0 <= out["low"] < 2.0 < out["high"] <= 3.0
    constant = planted_tokens.bootstrap_mean([0.5] * 4, index)
    assert constant == {"mean": 0.5, "low": 0.5, "high": 0.5}


def planted_pair(span_cost: str, n=12, k=3, h=16, seed=0):
    """Hidden states of one pair whose rejected side has k planted tokens (positions n-k..n-1 of n): "nothing", the
    planted states are copies of chosen states (cost 0) while the others are fresh; "everything", the planted states
    lie far from every chosen state while the others are near copies."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randn(1, n, h, generator=g)
    if span_cost == "nothing":
        rejected = torch.randn(1, n, h, generator=g)
        rejected[0, n - k :] = chosen[0, :k]
    else:
        rejected = chosen + 0.1 * torch.randn(1, n, h, generator=g)
        rejected[0, n - k :] = 6 + torch.randn(k, h, generator=g)
    mask = torch.ones(1, n, dtype=torch.bool)
    group = torch.arange(n) >= n - k
    return (chosen, rejected, mask, mask), group


@pytest.mark.parametrize("span_cost, direction", [("nothing", 1), ("everything", -1)])
def test_a_span_that_costs_nothing_or_everything_moves_its_share_as_the_math_says(span_cost, direction):
    # Entropic unbalanced OT gives a token mass in proportion to how cheaply it is matched: a span matched at cost 0
    # gains weight, one far from every counterpart loses it, the more the smaller ε; at a huge ε nothing moves.
    states, group = planted_pair(span_cost)
    measures = {}
    for reg in (1e6, 1.0, 0.1, 0.02):
        _, rejected = ot_token_weights(*states, reg=reg)
        measures[reg] = planted_tokens.group_measures(rejected[0], group)
    assert measures[1e6][0] == pytest.approx(1.0, abs=1e-4)  # (the AUROC sees the order, however small the gaps)
    ratios = [measures[r][0] for r in (1e6, 1.0, 0.1, 0.02)]
    assert all(direction * (b - a) > 0 for a, b in zip(ratios, ratios[1:]))  # further from 1 as ε falls
    assert direction * (measures[0.02][1] - 0.5) > 0.4  # the span's weights all above (below) the others'
    _, uniform = ot_token_weights(*states, weighting="uniform")
    assert planted_tokens.group_measures(uniform[0], group) == (1.0, 0.5)


# ------------------------------------------------------------------ the study


def test_study_end_to_end_and_render_only(tiny_model_dir, sample_data_dir, tmp_path):
    report = tmp_path / "planted" / "planted_tokens.md"
    argv = "--num_pairs 3 --answer_tokens 40 --ot_reg 1e6 0.02 --ot_cost_scale official".split()
    argv += ["--bootstrap", "50", "--sampo_draws", "2"]
    argv += ["--model", tiny_model_dir, "--data", str(sample_data_dir), "--report", str(report)]
    summary = planted_tokens.main(argv)
    saved = json.loads(report.with_suffix(".json").read_text())
    assert list(saved["kinds"]) == list(planted_variants.KINDS) and saved["settings"] == summary["settings"]
    assert (report.parent / "figures" / planted_tokens.FIGURE).read_bytes().startswith(b"\x89PNG")
    for kind in saved["kinds"].values():
        assert 1 <= kind["n_pairs"] <= 3
        for pair in kind["pairs"]:
            for side, positions in pair["positions"].items():
                assert positions == list(range(positions[0], positions[-1] + 1))
                assert positions[-1] < pair["n_tokens"][side]
                # the groups partition the side: their ratios, weighted by their token counts, average to 1
                counts = {"before": positions[0], "span": len(positions)}
                counts["after"] = pair["n_tokens"][side] - sum(counts.values())
                for measures in pair["measures"].values():
                    total = sum(n * measures[side][g][0] for g, n in counts.items() if n)
                    assert total == pytest.approx(pair["n_tokens"][side], rel=1e-9)
                # w/o OT: every token weighs the same, so share ratio 1 and AUROC 0.5, computed, not set
                assert pair["measures"]["w/o OT"][side]["span"] == [1.0, 0.5]
                # SamPO keeps every token of the shorter side (and samples the longer one): there too
                if pair["n_tokens"][side] == min(pair["n_tokens"].values()):
                    assert pair["measures"]["SamPO"][side]["span"] == [1.0, 0.5]
                assert pair["measures"]["OT ε 1e+06"][side]["span"][0] == pytest.approx(1.0, abs=1e-3)
    # Each pair's numbers are its own: computed again here, one pair per forward, from the package's inspection code.
    policy, _, tokenizer = load_model_and_tokenizer(tiny_model_dir, device="cpu")
    dataset = load_preference_dataset(str(sample_data_dir), "test")
    variants = build_variants(dataset, tokenizer, "filler", 3, max_length=512, answer_tokens=40)
    assert [v.row for v in variants] == [p["row"] for p in saved["kinds"]["filler"]["pairs"]]
    for v, pair in zip(variants, saved["kinds"]["filler"]["pairs"]):
        stats = pair_token_stats(policy, None, tokenizer, [v.example], max_length=512, reg=0.02)
        mask = planted_tokens.group_masks(v.positions["rejected"], v.n_tokens["rejected"])["span"]
        direct = planted_tokens.group_measures(stats.rejected_weights[0, : v.n_tokens["rejected"]], mask)
        assert pair["measures"]["OT ε 0.02"]["rejected"]["span"] == pytest.approx(direct, abs=1e-4)
    text = report.read_text()
    assert "## Reading" in text and "| rejected | OT ε 0.02 |" in text
    report.write_text("stale")
    planted_tokens.main(["--render_only", "--report", str(report)])
    assert report.read_text() == text


def test_scoring_refuses_tokens_other_than_the_ones_the_positions_come_from(tiny_model_dir, tokenizer):
    # Truncated by max_length, the scored tokens are not the ones the span's positions were found in.
    policy, _, _ = load_model_and_tokenizer(tiny_model_dir, device="cpu")
    variant = make_variant("filler", 0, PROMPT, CHOSEN, REJECTED)
    variant.positions = {"rejected": span_positions(variant.example, "rejected", variant.spans["rejected"], tokenizer)}
    variant.n_tokens = {s: len(tokenize_pair(variant.example, tokenizer)[f"{s}_ids"]) for s in ("chosen", "rejected")}
    settings = planted_tokens.weightings([1.0], ["official"])
    kwargs = dict(batch_size=1, draws=1, seed=0)
    assert planted_tokens.score(policy, tokenizer, [variant], settings, max_length=512, **kwargs)
    with pytest.raises(RuntimeError, match="data row 0: the scored chosen tokens are not the trainer's"):
        planted_tokens.score(policy, tokenizer, [variant], settings, max_length=40, **kwargs)


def test_options_are_checked_before_loading(tmp_path, capsys):
    for flags, message in ((["--num_pairs", "0"], "--num_pairs must be >= 1"), (["--ot_reg", "-1"], "`reg` must be")):
        with pytest.raises(SystemExit):
            planted_tokens.parse_args([*flags, "--model", str(tmp_path / "none")])
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="--render_only: no report JSON"):
        planted_tokens.main(["--render_only", "--report", str(tmp_path / "none" / "planted_tokens.md")])
