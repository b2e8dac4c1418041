from django.urls import path

from . import views

urlpatterns = [
    path("page/<str:name>", views.page),
    path("cookie/<str:name>", views.cookie_page),
    path("data/<str:name>", views.data_page),
    path("session/<str:name>", views.session_page),
    path("never/<str:name>", views.never_page),
    path("post", views.post),
    path("note/<str:text>", views.note),
]
