"""Initial schema: repos, versions, files, aliases, blobs, base models, tokens, uploads.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('base_model',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('revision', sa.String(length=100), nullable=True),
    sa.Column('family', sa.String(length=32), nullable=False),
    sa.Column('info', sa.JSON(), nullable=False),
    sa.Column('config_sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('blob',
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('sha256')
    )
    op.create_table('repo',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('namespace', sa.String(length=100), nullable=True),
    sa.Column('description', sa.String(), nullable=True),
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('next_version', sa.Integer(), nullable=False),
    sa.Column('latest_version', sa.Integer(), nullable=True),
    sa.Column('version_count', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name', name='uq_repo_name')
    )
    op.create_index('ix_repo_namespace_name', 'repo', ['namespace', 'name'])

    op.create_table('token',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('scopes', sa.JSON(), nullable=False),
    sa.Column('repos', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash', name='uq_token_hash')
    )
    op.create_table('upload',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('repo', sa.String(length=200), nullable=False),
    sa.Column('meta', sa.JSON(), nullable=False),
    sa.Column('files', sa.JSON(), nullable=False),
    sa.Column('part_size', sa.BigInteger(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('pushed_by', sa.String(length=200), nullable=True),
    sa.Column('version_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_upload_state_expires', 'upload', ['state', 'expires_at'])

    op.create_table('version',
    sa.Column('base_model', sa.String(length=200), nullable=False),
    sa.Column('base_model_revision', sa.String(length=100), nullable=True),
    sa.Column('adapter_type', sa.String(length=16), nullable=False),
    sa.Column('dtype', sa.String(length=16), nullable=True),
    sa.Column('parameter_count', sa.BigInteger(), nullable=True),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('description', sa.String(), nullable=True),
    sa.Column('task_description', sa.String(), nullable=True),
    sa.Column('parent', sa.String(length=300), nullable=True),
    sa.Column('pushed_by', sa.String(length=200), nullable=True),
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('repo_id', sa.Integer(), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('revision', sa.String(length=40), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('peft', sa.JSON(), nullable=True),
    sa.Column('examples', sa.JSON(), nullable=False),
    sa.Column('labels', sa.JSON(), nullable=False),
    sa.Column('upload_id', sa.String(length=32), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['repo_id'], ['repo.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('repo_id', 'number', name='uq_version_repo_number'),
    sa.UniqueConstraint('revision', name='uq_version_revision')
    )
    op.create_index('ix_version_base_status_id', 'version', ['base_model', 'status', 'id'])
    op.create_index('ix_version_repo_status_number', 'version', ['repo_id', 'status', 'number'])
    op.create_index('ix_version_status_id', 'version', ['status', 'id'])

    op.create_table('alias',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('repo_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['repo_id'], ['repo.id'], ),
    sa.ForeignKeyConstraint(['version_id'], ['version.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('repo_id', 'name', name='uq_alias_repo_name')
    )
    op.create_index('ix_alias_version_id', 'alias', ['version_id'])

    op.create_table('version_file',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('path', sa.String(length=255), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['version.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('version_id', 'path', name='uq_version_file_path')
    )
    op.create_index('ix_version_file_sha256', 'version_file', ['sha256'])



def downgrade() -> None:
    op.drop_index('ix_version_file_sha256', table_name='version_file')

    op.drop_table('version_file')
    op.drop_index('ix_alias_version_id', table_name='alias')

    op.drop_table('alias')
    op.drop_index('ix_version_status_id', table_name='version')
    op.drop_index('ix_version_repo_status_number', table_name='version')
    op.drop_index('ix_version_base_status_id', table_name='version')

    op.drop_table('version')
    op.drop_index('ix_upload_state_expires', table_name='upload')

    op.drop_table('upload')
    op.drop_table('token')
    op.drop_index('ix_repo_namespace_name', table_name='repo')

    op.drop_table('repo')
    op.drop_table('blob')
    op.drop_table('base_model')
