"""DAVIS 2017 semi-supervised video object segmentation by label propagation on frozen
features, as DINO's `eval_video_segmentation.py` does it (the protocol FLSL's paper follows),
scored with the measures of the official DAVIS 2017 evaluation (davis2017-evaluation).

`layout` (the DAVIS folders, checked), `frames` (reading and resizing frames and masks),
`propagation` (the label propagation, pure), `measures` (J, F and their statistics, pure),
`output` (the predicted PNGs, published whole), `api` (entry points), `report` (table, JSON).

Nothing heavy is imported here; import the submodules.
"""
