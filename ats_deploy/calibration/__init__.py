"""Input data: image folders and .npy arrays, preprocessed per the manifest."""
