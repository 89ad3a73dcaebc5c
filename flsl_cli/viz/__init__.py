"""Pictures of backbones and runs: similarity maps and cluster overlays (`flsl visualize`) and
the curves of a run (`flsl plot`). matplotlib is an optional dependency (`flsl[viz]`)."""
