"""The committed reports re-render byte for byte from their committed JSON (`--render_only`: nothing is trained or
scored), and the studies that write them stay out of the wheel."""

import shutil

import pytest
import tomllib
from setuptools import find_packages

from studies import dpo_vs_otpo, filler_reward, length_study, planted_tokens

from .testing_utils import REPO_ROOT


REPORTS = {
    "reports/length_study/length_study.md": length_study,
    "reports/length_study_reg0.1/length_study.md": length_study,
    "reports/length_study_reg0.02/length_study.md": length_study,
    "reports/length_study_ld_dpo/length_study.md": length_study,
    "reports/length_study_untruncated/length_study.md": length_study,
    "reports/length_study_untruncated_peers/length_study.md": length_study,
    "reports/dpo_vs_otpo/dpo_vs_otpo.md": dpo_vs_otpo,
    "reports/planted_tokens/planted_tokens.md": planted_tokens,
    "reports/filler_reward/filler_reward.md": filler_reward,
}


@pytest.mark.parametrize("report", sorted(REPORTS))
def test_the_committed_report_re_renders_identically_from_its_json(report, tmp_path):
    committed = REPO_ROOT / report
    copy = tmp_path / committed.parent.name / committed.name
    copy.parent.mkdir()
    shutil.copy(committed.with_suffix(".json"), copy.with_suffix(".json"))
    REPORTS[report].main(["--render_only", "--report", str(copy)])
    assert copy.read_text(encoding="utf-8") == committed.read_text(encoding="utf-8")
    # Every figure the Markdown shows is committed beside it.
    for name in ("figures/" + p.name for p in (committed.parent / "figures").glob("*.png")):
        assert name in committed.read_text(encoding="utf-8")


def test_render_only_needs_the_json(tmp_path):
    for study in (length_study, dpo_vs_otpo, planted_tokens, filler_reward):
        with pytest.raises(ValueError, match="--render_only: no"):
            study.main(["--render_only", "--report", str(tmp_path / "none" / "report.md")])


def test_the_wheel_packages_otpo_trl_only():
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert config == {"include": ["otpo_trl*"]}
    packages = find_packages(str(REPO_ROOT), include=config["include"])
    assert "otpo_trl" in packages and all(p.split(".")[0] == "otpo_trl" for p in packages)
    assert (REPO_ROOT / "studies" / "__init__.py").exists()  # a package, and yet not the wheel's
