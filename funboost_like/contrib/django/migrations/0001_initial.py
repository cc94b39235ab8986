"""The queue tables. On MySQL and MariaDB the name columns get a binary collation (a queue, key or
exchange name is case- and accent-sensitive there as on PostgreSQL and SQLite)."""

import time

from django.db import migrations, models

# (table, column, length) of the columns compared as names
NAME_COLUMNS = [
    ("funboost_like_message", "queue", 191),
    ("funboost_like_dead_letter", "queue", 191),
    ("funboost_like_record", "queue", 191),
    ("funboost_like_record", "namespace", 64),
    ("funboost_like_record", "key", 255),
    ("funboost_like_binding", "exchange", 191),
    ("funboost_like_binding", "queue", 191),
    ("funboost_like_binding", "key", 191),
]


def binary_name_columns(apps, schema_editor):
    connection = schema_editor.connection
    if connection.vendor != "mysql":
        return
    collation = "utf8mb4_nopad_bin" if connection.mysql_is_mariadb else "utf8mb4_bin"
    quote = schema_editor.quote_name
    for table, column, length in NAME_COLUMNS:
        schema_editor.execute(f"ALTER TABLE {quote(table)} MODIFY {quote(column)} varchar({length}) "
                              f"CHARACTER SET utf8mb4 COLLATE {collation} NOT NULL")


class Migration(migrations.Migration):

    initial = True

    dependencies: list[tuple[str, str]] = []

    operations = [
        migrations.CreateModel(
            name="Binding",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("exchange", models.CharField(max_length=191)),
                ("exchange_type", models.CharField(max_length=16)),
                ("queue", models.CharField(max_length=191)),
                ("key", models.CharField(max_length=191)),
            ],
            options={
                "db_table": "funboost_like_binding",
                "constraints": [models.UniqueConstraint(fields=("exchange", "queue", "key"),
                                                        name="funboost_like_binding_key")],
            },
        ),
        migrations.CreateModel(
            name="DeadLetter",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("queue", models.CharField(max_length=191, verbose_name="queue (topic)")),
                ("message_id", models.BigIntegerField(null=True)),
                ("body", models.BinaryField()),
                ("reason", models.TextField()),
                ("failed_at", models.FloatField()),
                ("attempts", models.IntegerField(default=0)),
            ],
            options={
                "db_table": "funboost_like_dead_letter",
                "indexes": [models.Index(fields=["queue", "-id"], name="funboost_like_dead_queue")],
            },
        ),
        migrations.CreateModel(
            name="QueuedMessage",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("queue", models.CharField(max_length=191, verbose_name="queue (topic)")),
                ("priority", models.IntegerField(default=0)),
                ("visible_at", models.FloatField()),
                ("owner", models.CharField(blank=True, max_length=64, null=True)),
                ("attempts", models.IntegerField(default=0)),
                ("crashes", models.IntegerField(default=0)),
                ("body", models.BinaryField()),
                ("created", models.FloatField(default=time.time, editable=False)),
            ],
            options={
                "verbose_name": "queued message",
                "db_table": "funboost_like_message",
                "indexes": [models.Index(fields=["queue", "-priority", "id", "visible_at"],
                                         name="funboost_like_take")],
            },
        ),
        migrations.CreateModel(
            name="Record",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("queue", models.CharField(max_length=191)),
                ("namespace", models.CharField(max_length=64)),
                ("key", models.CharField(max_length=255)),
                ("value", models.BinaryField()),
                ("expires_at", models.FloatField(db_index=True, null=True)),
            ],
            options={
                "db_table": "funboost_like_record",
                "constraints": [models.UniqueConstraint(fields=("queue", "namespace", "key"),
                                                        name="funboost_like_record_key")],
            },
        ),
        migrations.CreateModel(
            name="Queue",
            fields=[],
            options={"verbose_name": "queue", "proxy": True, "indexes": [], "constraints": []},
            bases=("funboost_like_django.queuedmessage",),
        ),
        migrations.RunPython(binary_name_columns, migrations.RunPython.noop, atomic=False, elidable=True),
    ]
