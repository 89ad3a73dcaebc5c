"""Evaluation of pretrained backbones: the paper's bounding-box-aligned k-NN (Appendix F) and
DINO's instance k-NN. `geometry` (resize/crop for pixels and boxes, box cells -> tokens),
`samples` (reading shards), `backbones` (what to evaluate), `features` (extraction, gather,
cache), `knn` (the search and the votes, pure), `api` (entry points), `report` (table, JSON).

Nothing heavy is imported here; import the submodules.
"""
