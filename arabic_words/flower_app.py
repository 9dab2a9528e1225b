"""The Celery app Flower monitors (``celery -A arabic_words.flower_app flower``, which ``arabic-words flower`` runs):
the service's own broker configuration, so a Sentinel ``REDIS_URL`` (master name, timeouts) works as it does for
the web app and the workers. Built from the settings in Flower's environment, which ``arabic-words flower``
validated before it started Flower."""

from shared.config import Settings
from shared.queue import make_celery

app = make_celery(Settings(), main="arabic_words_flower")
