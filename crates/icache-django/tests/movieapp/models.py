# The seed README's example, verbatim where it is code ("... some code ..."
# filled with a field so the model can be saved).
from django.db import models
from django.db.models.signals import post_save

from django_icache import icache


class Movie(models.Model):
    title = models.CharField(max_length=200)
    rating = models.IntegerField(default=0)

    class Meta:
        app_label = "movieapp"


def movie_cache_post_save(sender, **kwargs):
    icache.incr('movies') # increments value, stored by 'movies' key
post_save.connect(movie_cache_post_save, sender=Movie)


# Not the seed's: a model whose str() is not unique (issue 19, case 6).
class Film(models.Model):
    title = models.CharField(max_length=200)
    rating = models.IntegerField(default=0)

    class Meta:
        app_label = "movieapp"

    def __str__(self):
        return self.title
