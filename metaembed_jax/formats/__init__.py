"""Run directories and foreign formats: load_trained, Hugging Face / PEFT export, and models
trained with the reference PyTorch code."""
