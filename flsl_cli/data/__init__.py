"""Data: demo-data generation, shard listing and reading, augmentation, the training stream."""
