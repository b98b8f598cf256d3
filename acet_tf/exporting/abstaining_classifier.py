"""The exported tf.Module: a classifier that abstains below a confidence threshold.

AbstainingClassifier wraps a Keras model returning logits with the signatures
  serving_default  images float32 [None, H, W, C] in [0, 1]
  serving_uint8    images uint8 [None, H, W, C] in 0..255
  with_threshold   images float32 [None, H, W, C] in [0, 1], threshold float32 [] in [0, 1]
  serving_image_bytes  image_bytes string [None]: encoded PNG, JPEG, GIF or BMP files, decoded in
                   the graph (decode_images: the model's channels, its H x W, pixel / 255)
each returning OUTPUTS; the threshold is its variable `threshold`, changed with set_threshold(t).
"""

import tensorflow as tf

SIGNATURES = ('serving_default', 'serving_uint8', 'with_threshold', 'serving_image_bytes')
OUTPUTS = ('probabilities', 'confidence', 'predicted_class', 'class_name', 'accepted')
# Inclusive value range of each signature input; the server checks requests against these.
INPUT_RANGES = {
  'serving_default': {'images': (0.0, 1.0)},
  'serving_uint8': {'images': (0, 255)},
  'with_threshold': {'images': (0.0, 1.0), 'threshold': (0.0, 1.0)},
  'serving_image_bytes': {'image_bytes': None},  # Encoded files: no numeric range.
}


_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma.


def decode_images(image_bytes, image_shape):
  """Encoded image files -> float32 [N, H, W, C] in [0, 1], as the model's inputs are made.

  image_bytes: string [N], each a PNG, JPEG, GIF (first frame) or BMP file. Only standard ops
  (DecodeImage, a while loop), so TensorFlow Serving runs it. Each image is converted to C channels
  (alpha dropped; RGB -> gray with ITU-R 601 weights, which sum to 1 so a gray image saved as RGB
  (GIF, some PNGs) gives its gray values back; gray -> RGB by copying),
  then scaled to [0, 1] as pixel / 255 like the training data (input_pipeline), and resized to
  H x W only if its size differs: the datasets are used at their native size, so a file of that
  size gives exactly the training pixels; other sizes are stretched to H x W (aspect ratio not
  kept): an area average when shrinking (exact for integer factors), bilinear when enlarging.
  A file that is not a decodable image fails the whole call with InvalidArgumentError.
  """
  h, w, c = image_shape
  if c not in (1, 3):
    raise ValueError(f'decode_images handles 1 or 3 channels, the model has {c}.')

  def one(data):
    image = tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)
    image = tf.cast(image, tf.float32) / 255.0  # [h, w, 1..4].
    n = tf.shape(image)[-1]
    image = image[..., : tf.where(n % 2 == 0, n - 1, n)]  # Drops alpha: 1 or 3 channels left.
    if c == 1:
      image = tf.cond(
        tf.shape(image)[-1] == 3,
        lambda: tf.reduce_sum(image * _GRAY_WEIGHTS, axis=-1, keepdims=True),
        lambda: image,
      )
    else:
      image = tf.cond(
        tf.shape(image)[-1] == 1, lambda: tf.image.grayscale_to_rgb(image), lambda: image
      )
    image = tf.ensure_shape(image, [None, None, c])
    size = tf.shape(image)[:2]
    same = tf.reduce_all(size == tf.constant([h, w]))
    shrink = tf.reduce_all(size >= tf.constant([h, w]))
    image = tf.cond(
      same,
      lambda: image,
      lambda: tf.clip_by_value(
        tf.cond(
          shrink,
          lambda: tf.image.resize(image, [h, w], method='area'),
          lambda: tf.image.resize(image, [h, w], method='bilinear', antialias=True),
        ),
        0.0,
        1.0,
      ),
    )
    return tf.ensure_shape(image, [h, w, c])

  return tf.map_fn(one, image_bytes, fn_output_signature=tf.TensorSpec([h, w, c], tf.float32))


class AbstainingClassifier(tf.Module):
  """A classifier that reports its confidence and abstains below `threshold`.

  Attributes saved with it: `model` (the Keras model's weights), `threshold` (a float32 variable),
  the tf.functions of SIGNATURES and `set_threshold(t)`.
  """

  def __init__(self, model, image_shape, threshold, class_names):
    super().__init__(name='abstaining_classifier')
    self.model = model
    # A constant in the graph, so TF Serving returns the names with no lookup on the client.
    names = tf.constant([str(n) for n in class_names], tf.string)
    self.threshold = tf.Variable(
      float(threshold), dtype=tf.float32, trainable=False, name='threshold'
    )
    shape = [None] + list(image_shape)
    images_f32 = tf.TensorSpec(shape, tf.float32, name='images')
    images_u8 = tf.TensorSpec(shape, tf.uint8, name='images')
    scalar = tf.TensorSpec([], tf.float32, name='threshold')
    # TF Serving's REST API takes DT_STRING values as {"b64": ...}; the _bytes suffix is the name
    # other TF serving front ends look for.
    encoded = tf.TensorSpec([None], tf.string, name='image_bytes')

    # The checks guard TensorFlow Serving, which has no other input validation; acet_tf.serve
    # validates requests before they get here and names the problem.
    def classify(images, threshold):
      tf.debugging.assert_all_finite(images, 'images must be finite')
      tf.debugging.assert_greater_equal(images, 0.0, 'images must be in [0, 1]')
      tf.debugging.assert_less_equal(images, 1.0, 'images must be in [0, 1]')
      probs = tf.nn.softmax(tf.cast(self.model(images, training=False), tf.float32))
      confidence = tf.reduce_max(probs, axis=1)
      predicted = tf.argmax(probs, axis=1, output_type=tf.int32)
      return {
        'probabilities': probs,
        'confidence': confidence,
        'predicted_class': predicted,
        'class_name': tf.gather(names, predicted),
        'accepted': confidence >= threshold,
      }

    def check_threshold(threshold):
      tf.debugging.assert_all_finite(threshold, 'threshold must be finite')
      tf.debugging.assert_greater_equal(threshold, 0.0, 'threshold must be in [0, 1]')
      tf.debugging.assert_less_equal(threshold, 1.0, 'threshold must be in [0, 1]')

    @tf.function(input_signature=[images_f32])
    def serving_default(images):
      return classify(images, self.threshold)

    @tf.function(input_signature=[images_u8])
    def serving_uint8(images):
      return classify(tf.cast(images, tf.float32) / 255.0, self.threshold)

    @tf.function(input_signature=[images_f32, scalar])
    def with_threshold(images, threshold):
      check_threshold(threshold)
      return classify(images, threshold)

    @tf.function(input_signature=[encoded])
    def serving_image_bytes(image_bytes):
      return classify(decode_images(image_bytes, image_shape), self.threshold)

    @tf.function(input_signature=[scalar])
    def set_threshold(threshold):
      check_threshold(threshold)
      self.threshold.assign(threshold)
      return self.threshold.read_value()

    self.serving_default = serving_default
    self.serving_uint8 = serving_uint8
    self.with_threshold = with_threshold
    self.serving_image_bytes = serving_image_bytes
    self.set_threshold = set_threshold

  def signatures(self):
    return {name: getattr(self, name).get_concrete_function() for name in SIGNATURES}
