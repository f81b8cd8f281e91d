//! Pushing a Wasm binary to a registry as a CNCF Wasm OCI artifact.

use super::{Credentials, Registry, classify};
use crate::error::{Error, Result};
use crate::images::store::WasmArtifact;
use crate::model::ids::Digest;
use crate::model::image::ImageName;

impl Registry {
    /// Pushes `bytes` (a module or component) to `reference` as a CNCF Wasm
    /// OCI artifact. Returns the manifest digest.
    pub async fn push_wasm(
        &self,
        bytes: &[u8],
        reference: &str,
        credentials: &Credentials,
    ) -> Result<Digest> {
        let name = ImageName::parse(reference)?;
        let oci_ref = Self::reference(&name, reference)?;
        let auth = self.auth_for(&oci_ref, credentials, "pull,push").await?;
        let registry = oci_ref.resolve_registry().to_owned();
        let artifact = WasmArtifact::new(bytes, reference)?;
        let client = self.client();
        client
            .auth(&oci_ref, &auth, oci_client::RegistryOperation::Push)
            .await
            .map_err(|e| classify(reference, &registry, e))?;
        for blob in [bytes, &artifact.config[..]] {
            let digest = Digest::of(blob);
            client
                .push_blob(&oci_ref, blob.to_vec(), digest.as_str())
                .await
                .map_err(|e| classify(reference, &registry, e))?;
        }
        let content_type = crate::images::store::OCI_MANIFEST_MEDIA_TYPE
            .parse()
            .map_err(|_| Error::Internal("manifest media type header".into()))?;
        client
            .push_manifest_raw(&oci_ref, artifact.manifest.clone(), content_type)
            .await
            .map_err(|e| classify(reference, &registry, e))?;
        Ok(Digest::of(&artifact.manifest))
    }
}
