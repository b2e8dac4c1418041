"""Models of the outbox tests (registered in the test app ``movieapp``)."""

import uuid

from django.db import models


class ObViewer(models.Model):
    name = models.CharField(max_length=50)

    class Meta:
        app_label = "movieapp"


class ObFilm(models.Model):
    title = models.CharField(max_length=200)

    class Meta:
        app_label = "movieapp"


class ObRating(models.Model):
    user = models.ForeignKey(ObViewer, on_delete=models.CASCADE, null=True)
    film = models.ForeignKey(ObFilm, on_delete=models.CASCADE)
    stars = models.IntegerField(default=0)

    class Meta:
        app_label = "movieapp"


class ObOdd(models.Model):
    """Field types with and without a token spelling in SQL."""

    code = models.UUIDField(primary_key=True, default=uuid.uuid4)
    flag = models.BooleanField(default=False)
    when = models.DateTimeField(null=True)
    tags = models.ManyToManyField(ObFilm)
    weird = models.CharField(max_length=20, db_column="Weird Col", default="")

    class Meta:
        app_label = "movieapp"


class ObFilmProxy(ObFilm):
    class Meta:
        proxy = True
        app_label = "movieapp"


class ObSpecialFilm(ObFilm):
    """Multi-table inheritance: its own table holds only `extra`."""

    extra = models.IntegerField(default=0)

    class Meta:
        app_label = "movieapp"
