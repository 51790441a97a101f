"""Using a released model: batch inference over a corpus (batch), an HTTP server (server), explanations (explain).

`runtime.load_predictor` is the one place a model folder is loaded for prediction; all three use it."""
