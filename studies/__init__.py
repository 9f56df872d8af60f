"""The studies of this repository: they train and score with `otpo_trl` and write `reports/<study>/`.

Not part of the wheel (`pyproject.toml` packages `otpo_trl*` only): a study reads the checkout's recipes and data and
writes its reports. `scripts/length_study.py` and `scripts/compare_dpo_otpo.py` run them (`make study`, `make report`).

`common.py` is what they share (the arms, training an arm, the runs' logs, figures and Markdown, `--render_only`) and
`scoring.py` how they score (in this process, one cache); `length_study.py` drives the length study over its
`length_settings.py`, `length_stats.py`, `length_baseline.py` and `length_report.py`; `dpo_vs_otpo.py` is the
comparison, `planted_tokens.py` the planted-token check.
"""
