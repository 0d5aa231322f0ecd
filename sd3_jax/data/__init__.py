"""Datasets: the spatial-scenes benchmark, VSD readers, scene graphs, input pipeline."""
