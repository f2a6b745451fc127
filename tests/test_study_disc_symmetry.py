"""benchmarks/study/disc_symmetry.py's flips, checked with a discriminator whose score is one
cell of the mask: each flip moves that cell's value to a known corner."""

from __future__ import annotations


import torch
from study_scripts import load_study_script


def _module():
    return load_study_script("disc_symmetry")


def test_flip_scores_move_the_top_left_cell_to_each_corner():
    grid = torch.zeros(4, 7, 7)
    grid[:, 0, 0] = 1.0          # every mask hides the top-left cell
    grid[:2, 0, 6] = 1.0         # half of them the top-right one too
    grid[:1, 6, 0] = 1.0         # a quarter the bottom-left one
    # bottom-right: never
    scores = _module().flip_scores(lambda m: m[:, 0, 0], grid)   # D reads the top-left cell
    # the flips bring the top-right, bottom-left and bottom-right cells to the top left
    assert scores == {"as generated": 1.0, "flipped left-right": 0.5,
                      "flipped up-down": 0.25, "rotated 180": 0.0}
