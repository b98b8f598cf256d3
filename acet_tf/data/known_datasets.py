"""Recorded facts of the paper's datasets, for models whose data is not on this machine.

An imported model (acet_tf.import_reference) needs only the image shape and the number of classes
to be built, evaluated on noise, exported and served; `get_info` supplies them from this table
when TFDS cannot load the dataset, marks the result `has_data=False` and says so in the log.
Everything that needs the images themselves (test error, AUROC, permuted noise) must check
`info.has_data` and report what it did not run.
"""

from absl import logging

from acet_tf.data import input_pipeline

_CIFAR10 = (
  'airplane',
  'automobile',
  'bird',
  'cat',
  'deer',
  'dog',
  'frog',
  'horse',
  'ship',
  'truck',
)
# CIFAR-100's 100 fine labels in label order (alphabetical, as the dataset defines them).
_CIFAR100 = tuple(
  """
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower
leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange
orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit
raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel
streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip
turtle wardrobe whale willow_tree wolf woman worm""".split()
)
_DIGITS = tuple(str(k) for k in range(10))

# name: (image shape, class names, train examples, test examples), as TFDS defines them.
KNOWN = {
  'mnist': ((28, 28, 1), _DIGITS, 60_000, 10_000),
  'svhn_cropped': ((32, 32, 3), _DIGITS, 73_257, 26_032),  # Class k is the digit k.
  'cifar10': ((32, 32, 3), _CIFAR10, 50_000, 10_000),
  'cifar100': ((32, 32, 3), _CIFAR100, 50_000, 10_000),
}


def recorded_info(name):
  """DatasetInfo of `name` from the table, with has_data=False; ValueError if not recorded."""
  if name not in KNOWN:
    raise ValueError(f'No recorded facts for dataset {name!r} (known: {", ".join(KNOWN)}).')
  shape, class_names, num_train, num_test = KNOWN[name]
  return input_pipeline.DatasetInfo(
    name=name,
    image_shape=shape,
    num_classes=len(class_names),
    num_train_examples=num_train,
    num_test_examples=num_test,
    class_names=class_names,
    has_data=False,
  )


def info_or_recorded(name, data_dir=None, options=None):
  """input_pipeline.get_info, or the recorded facts (has_data=False) if the data is absent.

  `options` convert a folder: or npz: dataset (input_pipeline.options_from_config); such data is
  never recorded, so its errors pass through.

  Raises input_pipeline.DatasetUnavailableError if the data is absent and `name` is not recorded.
  """
  try:
    return input_pipeline.get_info(name, data_dir, options)
  except input_pipeline.DatasetUnavailableError as e:
    if name not in KNOWN:
      raise
    logging.warning(
      'Dataset %s is not on this machine (%s). Using its recorded image shape and '
      'classes: the model can be built and run on noise, but nothing that needs '
      'its images (test error, AUROC, permuted noise, calibration) will run.',
      name,
      str(e).split(':', 1)[0],
    )
    return recorded_info(name)
