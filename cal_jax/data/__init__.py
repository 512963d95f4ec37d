"""The data flow up to the network: data sets, splits in memory, sampler, augmentation, streams.

datasets/       tfds builders, folder listings, synthetic data, the `DatasetSpec` table
splits          `load_splits(config, workdir)`: the train and test splits in memory
images          PIL decoding and resizing
sampler         P identities x (K visible + K infrared) images per step
augment         the training transform
train_stream    the pmapped training batches of every step
eval_batches    fixed-shape batches of the test images to embed
modality        the two modalities' names and indices
"""
