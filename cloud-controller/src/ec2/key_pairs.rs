//! CreateKeyPair, ImportKeyPair, DescribeKeyPairs, DeleteKeyPair.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use canopy_common::KeyPairId;
use canopy_ec2_wire::xml::{XmlWriter, timestamp};
use chrono::Utc;

use super::filters::{self, Filterable};
use super::{ApiError, Ctx, render, tags};
use crate::key_material::{self, KeyError, KeyFormat, KeyType};
use crate::state::{Command, KeyPair, KeyPairRef, Outcome};

/// EC2's limit on a key pair's name.
const MAX_KEY_NAME: usize = 255;

/// A key name as EC2 accepts it: 1 to 255 ASCII characters.
fn key_name(ctx: &Ctx) -> Result<String, ApiError> {
    let name = ctx
        .params
        .get("KeyName")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::missing("KeyName"))?;
    if name.len() > MAX_KEY_NAME || !name.is_ascii() || name.chars().any(|c| c.is_ascii_control()) {
        return Err(ApiError::invalid(format!(
            "Value ({name}) for parameter keyName is invalid. Key names are 1 to {MAX_KEY_NAME} printable ASCII characters."
        )));
    }
    Ok(name.to_owned())
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Format(why) => Self::new(400, "InvalidKey.Format", why),
            KeyError::Internal(why) => {
                tracing::error!(error = %why, "key pair generation failed");
                Self::internal()
            }
        }
    }
}

pub async fn create_key_pair(ctx: &Ctx) -> Result<String, ApiError> {
    let name = key_name(ctx)?;
    let key_type = match ctx.params.get("KeyType").filter(|t| !t.is_empty()) {
        None => KeyType::Rsa,
        Some(t) => KeyType::parse(t).ok_or_else(|| {
            ApiError::invalid(format!(
                "Value ({t}) for parameter keyType is invalid. Expected: 'rsa' or 'ed25519'."
            ))
        })?,
    };
    let format = match ctx.params.get("KeyFormat").filter(|t| !t.is_empty()) {
        None => KeyFormat::Pem,
        Some(f) => KeyFormat::parse(f).ok_or_else(|| {
            ApiError::invalid(format!(
                "Value ({f}) for parameter keyFormat is invalid. Expected: 'pem' or 'ppk'."
            ))
        })?,
    };
    let tags = tags::for_new_resource(&ctx.params, "key-pair")?;
    ctx.dry_run()?;
    let comment = name.clone();
    // RSA generation is tens of milliseconds of arithmetic: off the async workers.
    let created =
        tokio::task::spawn_blocking(move || key_material::create(key_type, format, &comment))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "key generation task failed");
                ApiError::internal()
            })??;
    let key_pair = KeyPair {
        key_pair_id: KeyPairId::generate(),
        account_id: ctx.account.clone(),
        key_name: name,
        key_type,
        fingerprint: created.fingerprint.clone(),
        public_key: created.public_key.clone(),
        created_at: Utc::now(),
        tags: vec![],
    };
    submit_key_pair(ctx, &key_pair, &tags).await?;
    let mut w = XmlWriter::response("CreateKeyPair", &ctx.request_id);
    w.elem("keyName", &key_pair.key_name)
        .elem("keyFingerprint", &key_pair.fingerprint)
        .elem("keyMaterial", &created.private_key)
        .elem("keyPairId", &key_pair.key_pair_id);
    render::tag_set(&mut w, &tags);
    Ok(w.finish())
}

pub async fn import_key_pair(ctx: &Ctx) -> Result<String, ApiError> {
    let name = key_name(ctx)?;
    let material = ctx
        .params
        .get("PublicKeyMaterial")
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::missing("PublicKeyMaterial"))?;
    let compact: String = material
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let material = STANDARD.decode(compact).map_err(|_| {
        ApiError::new(
            400,
            "InvalidKey.Format",
            "PublicKeyMaterial is not valid base64",
        )
    })?;
    let imported = key_material::import(&material)?;
    let tags = tags::for_new_resource(&ctx.params, "key-pair")?;
    ctx.dry_run()?;
    let key_pair = KeyPair {
        key_pair_id: KeyPairId::generate(),
        account_id: ctx.account.clone(),
        key_name: name,
        key_type: imported.key_type,
        fingerprint: imported.fingerprint,
        public_key: imported.public_key,
        created_at: Utc::now(),
        tags: vec![],
    };
    submit_key_pair(ctx, &key_pair, &tags).await?;
    let mut w = XmlWriter::response("ImportKeyPair", &ctx.request_id);
    w.elem("keyFingerprint", &key_pair.fingerprint)
        .elem("keyName", &key_pair.key_name)
        .elem("keyPairId", &key_pair.key_pair_id);
    render::tag_set(&mut w, &tags);
    Ok(w.finish())
}

async fn submit_key_pair(
    ctx: &Ctx,
    key_pair: &KeyPair,
    tags: &[crate::state::Tag],
) -> Result<(), ApiError> {
    ctx.clc
        .submit(Command::CreateKeyPair {
            key_pair: key_pair.clone(),
            tags: tags.to_vec(),
        })
        .await?;
    Ok(())
}

impl Filterable for KeyPair {
    fn filter_values(&self, name: &str) -> Option<Vec<String>> {
        if let Some(values) = filters::tag_values(&self.tags, name) {
            return Some(values);
        }
        let one = |s: &str| Some(vec![s.to_owned()]);
        match name {
            "key-pair-id" => one(self.key_pair_id.as_str()),
            "key-name" => one(&self.key_name),
            "fingerprint" => one(&self.fingerprint),
            "key-type" => one(self.key_type.name()),
            _ => None,
        }
    }
}

pub async fn describe_key_pairs(ctx: &Ctx) -> Result<String, ApiError> {
    let filters = filters::parse_filters(&ctx.params)?;
    let names = ctx.params.list("KeyName")?;
    let ids = ctx.params.list("KeyPairId")?;
    let include_public_key = ctx.params.bool("IncludePublicKey")?.unwrap_or(false);
    let probe = KeyPair {
        key_pair_id: KeyPairId::generate(),
        account_id: ctx.account.clone(),
        key_name: String::new(),
        key_type: KeyType::Rsa,
        fingerprint: String::new(),
        public_key: String::new(),
        created_at: Utc::now(),
        tags: vec![],
    };
    filters::validate(&filters, &probe)?;
    ctx.dry_run()?;
    let all = ctx.clc.store.key_pairs(&ctx.account).await?;
    // Every key pair asked for by name or id must exist, as on EC2.
    for name in &names {
        if !all.iter().any(|k| &k.key_name == name) {
            return Err(key_pair_not_found(name));
        }
    }
    for id in &ids {
        if !all.iter().any(|k| k.key_pair_id.as_str() == id) {
            return Err(key_pair_not_found(id));
        }
    }
    let selected: Vec<&KeyPair> = all
        .iter()
        .filter(|k| names.is_empty() || names.contains(&k.key_name))
        .filter(|k| ids.is_empty() || ids.iter().any(|i| i == k.key_pair_id.as_str()))
        .filter(|k| filters::matches(*k, &filters))
        .collect();
    let mut w = XmlWriter::response("DescribeKeyPairs", &ctx.request_id);
    w.list("keySet", &selected, |w, k| {
        w.elem("keyPairId", &k.key_pair_id)
            .elem("keyType", k.key_type.name());
        render::tag_set(w, &k.tags);
        if include_public_key {
            w.elem("publicKey", k.public_key_line());
        }
        w.elem("createTime", timestamp(k.created_at))
            .elem("keyName", &k.key_name)
            .elem("keyFingerprint", &k.fingerprint);
    });
    Ok(w.finish())
}

pub fn key_pair_not_found(name: &str) -> ApiError {
    ApiError::new(
        400,
        "InvalidKeyPair.NotFound",
        format!("The key pair '{name}' does not exist"),
    )
}

pub async fn delete_key_pair(ctx: &Ctx) -> Result<String, ApiError> {
    let name = ctx.params.get("KeyName").filter(|n| !n.is_empty());
    let id = ctx.params.get("KeyPairId").filter(|n| !n.is_empty());
    let key = match (name, id) {
        (Some(name), None) => KeyPairRef::Name(name.to_owned()),
        (None, Some(id)) => {
            KeyPairRef::Id(KeyPairId::parse(id).map_err(|_| key_pair_not_found(id))?)
        }
        (None, None) => return Err(ApiError::missing("KeyName")),
        (Some(_), Some(_)) => {
            return Err(ApiError::combination(
                "The parameters KeyName and KeyPairId cannot be used together",
            ));
        }
    };
    if ctx.params.bool("DryRun")?.unwrap_or(false) {
        if let KeyPairRef::Id(id) = &key
            && !ctx
                .clc
                .store
                .key_pairs(&ctx.account)
                .await?
                .iter()
                .any(|k| &k.key_pair_id == id)
        {
            return Err(key_pair_not_found(id.as_str()));
        }
        return Err(ApiError::dry_run());
    }
    let outcome = ctx
        .clc
        .submit(Command::DeleteKeyPair {
            account_id: ctx.account.clone(),
            key,
        })
        .await?;
    let deleted = match outcome {
        Outcome::KeyPairDeleted(id) => id,
        other => {
            tracing::error!(?other, "DeleteKeyPair produced an unexpected outcome");
            return Err(ApiError::internal());
        }
    };
    let mut w = XmlWriter::response("DeleteKeyPair", &ctx.request_id);
    w.bool_elem("return", true)
        .opt_elem("keyPairId", deleted.as_ref());
    Ok(w.finish())
}
