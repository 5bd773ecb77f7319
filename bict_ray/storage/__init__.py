"""What bict-ray keeps in files: gallery versions (Parquet shards + a manifest committed last), trained models and
transforms with their cards, and the run directory that ties them together. No Ray."""
