"""The method in plain torch and numpy: datasets and upgrade-scenario splits, the embedding network phi and the
upgrade transform psi, the BiCT losses, and the two functions that turn images into stored embeddings and stored
embeddings into upgraded ones. Nothing here imports Ray or touches a run directory."""
