"""Basis distributions for DGA's distribution reweighting: an (m, k) matrix whose row j is a
distribution P_j over the k domains; DGA then moves weights β over the m rows and samples
training batches by α = Σ_j β_j P_j.

`load_bases` reads the matrix from what the `bases` option gives: a .npy, .pt or .json file,
or the matrix itself (nested lists, e.g. histograms from `--mixer-option bases=[[...], ...]`, an
array or a tensor). Rows are normalised, so counts (histograms) do as well as distributions.
The store's coarse clustering (`bases=coarse`) is read by fastmix.data.cluster.coarse_bases.
"""
import json
import os

import numpy as np
import torch

COARSE = "coarse"  # the `bases` value that names the store's coarse clustering
SUFFIXES = (".npy", ".pt", ".json")


def read_bases_file(path):
    """The matrix held by a .npy, .pt (a tensor or nested lists) or .json file (a list of rows,
    or an object {name: row}, its rows in order). ValueError naming the option otherwise."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"bases={path}: expected a {', '.join(SUFFIXES)} file (or {COARSE!r}, or the matrix itself)")
    if not os.path.isfile(path):
        raise ValueError(f"bases={path}: no such file")
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".pt":
            return torch.load(path, map_location="cpu", weights_only=True)
        with open(path, encoding="utf-8") as f:
            matrix = json.load(f)
        return list(matrix.values()) if isinstance(matrix, dict) else matrix
    except Exception as error:  # a corrupt file of any of the three kinds: one line, not a traceback
        raise ValueError(f"bases={path}: cannot read it ({type(error).__name__}: {error})") from None


def load_bases(bases, num_domains):
    """The (m, k) basis distributions of the `bases` option (see the module docstring) as a
    float64 CPU tensor whose rows sum to 1; ValueError naming the option unless it is an
    (m, num_domains) matrix, m >= 1, finite and non-negative, with no row all zero."""
    where = "bases"
    if isinstance(bases, (str, os.PathLike)):
        if os.fspath(bases) == COARSE:
            raise ValueError(f"bases={COARSE!r} is the store's coarse clustering: build the mixer from the store "
                             f"(fastmix.mixing.build_mixer('dga', store, bases={COARSE!r}))")
        where = f"bases={os.fspath(bases)}"
        bases = read_bases_file(os.fspath(bases))
    try:
        matrix = torch.as_tensor(np.asarray(bases.cpu() if torch.is_tensor(bases) else bases, dtype=np.float64))
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be an (m, {num_domains}) matrix of numbers, one row per basis "
                         "distribution") from None
    if matrix.dim() != 2 or matrix.shape[0] < 1 or matrix.shape[1] != num_domains:
        raise ValueError(f"{where} must be an (m, {num_domains}) matrix, one row per basis distribution over the "
                         f"{num_domains} domains, got shape {tuple(matrix.shape)}")
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"{where} must be finite; row {int(torch.isfinite(matrix).all(1).logical_not().nonzero()[0])} "
                         "is not")
    if bool((matrix < 0).any()):
        row, column = (int(i) for i in (matrix < 0).nonzero()[0])
        raise ValueError(f"{where} must be non-negative; row {row} has {float(matrix[row, column])} at domain {column}")
    sums = matrix.sum(1, keepdim=True)
    if bool((sums <= 0).any()):
        raise ValueError(f"{where}: row {int((sums[:, 0] <= 0).nonzero()[0])} is all zero; every basis distribution "
                         "needs a positive entry")
    return matrix / sums
