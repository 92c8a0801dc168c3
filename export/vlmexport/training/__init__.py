"""The default model: synthetic shape pictures and questions (synthetic) and its training
(train_default)."""
