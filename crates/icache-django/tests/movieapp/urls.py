from django.urls import path

from . import views

urlpatterns = [
    path("page/<str:name>", views.page),
    path("post", views.post),
    path("note/<str:text>", views.note),
]
