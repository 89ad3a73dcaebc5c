"""Networks: the ViT backbone, the projection head, and the student/teacher pair."""
