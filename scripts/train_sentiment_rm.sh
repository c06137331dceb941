#!/usr/bin/env bash
# Reproduce the shipped sentiment reward model polyalign/assets/sentiment_rm (stories260K-sentiment-rm).
# About 2-5 minutes on one CPU thread; deterministic with --threads 1 (bit-identical weights on rerun).
# Settings chosen from two runs by val pairwise accuracy and by agreement with the lexicon reward on 200
# stories sampled from stories260K: 4 epochs lr 3e-3 gave val 0.846 / story AUC vs lexicon 0.64;
# 6 epochs lr 2e-3 (below) gave val 0.858 / 0.88. The test split was not used to choose.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m polyalign.recipes.sentiment_rm --base stories260K --out polyalign/assets/sentiment_rm \
  --epochs 6 --lr 0.002 --batch-size 32 --seed 0 --weight-decay 0.01 --max-length 128 --threads 1 "$@"
