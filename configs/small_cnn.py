"""SmallCNN trained from scratch on the MNIST digits at 28 px: the base of
the method configs (distill, domain, adversarial), and a quick job itself.

  python scripts/finetune.py --config configs/small_cnn.py --workdir runs/small_cnn
"""

from configs import default


def get_config(arg=None):
  del arg
  c = default.get_config()
  c.model = "small_cnn"
  c.pretrained = False
  c.image_size = 28
  c.strategy.rules = ((".*", "all"),)
  c.learning_rate = 2e-3
  c.num_steps = 300
  return c
