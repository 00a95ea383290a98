"""Datasets: the synthetic shapes domain, webdataset shards, importers."""

from miroflow.data.sample import Sample

__all__ = ["Sample"]
