"""The studies of this repository: they train and score with `otpo_trl` and write `reports/<study>/`.

Not part of the wheel (`pyproject.toml` packages `otpo_trl*` only): a study reads the checkout's recipes and data and
writes its reports. `scripts/length_study.py` and `scripts/compare_dpo_otpo.py` run them (`make study`, `make report`).
"""
