// A VM Scale Set whose instances run kv-agent from their first boot.
//
// NOT DEPLOYED by kv-agent's tests: there is no Azure subscription in CI. It is
// checked by parsing only (tests/test_deploy_examples.py: its parameters, the
// role and its scope, that custom data is cloud-init.yaml with the placeholders
// that file has). The recipe it carries is the one the system test boots.
//
// What it adds to an existing vault (RBAC permission model) and subnet:
//  1. a user-assigned identity for the scale set;
//  2. the role "Key Vault Secrets User" for that identity, on the vault alone;
//  3. the scale set, after the role assignment (dependsOn), with that identity,
//     and cloud-init.yaml as custom data, its vault and package filled in.
// A user-assigned identity, not the scale set's system-assigned one: it and its
// role exist before any instance boots, so an instance's first boot does not
// race the assignment. (Azure can still take a few minutes to apply a new
// assignment; kv-agent retries a 403 and reports READY only with its files.)
//
// Deploy: az deployment group create -g RG -f docs/deploy/vmss.bicep \
//   -p vaultName=... subnetId=... adminUsername=... adminSshPublicKey=@key.pub \
//      packageUrl=https://.../kv-agent_0.1.0_all.deb packageSha256=...

@description('Name of the existing key vault, in this resource group, using the RBAC permission model.')
param vaultName string

@description('Resource id of the subnet the instances join.')
param subnetId string

@description('URL of the kv-agent .deb the instances install.')
param packageUrl string

@description('SHA-256 of that .deb (sha256sum), checked before it is installed.')
param packageSha256 string

param adminUsername string

@description('SSH public key for adminUsername (no password login).')
param adminSshPublicKey string

param location string = resourceGroup().location
param scaleSetName string = 'app'
param instanceCount int = 2
param vmSize string = 'Standard_B2s'

// Built-in role "Key Vault Secrets User": read secret contents (getSecret and
// readMetadata data actions). Id from Microsoft's list of built-in roles
// (learn.microsoft.com/azure/role-based-access-control/built-in-roles/security).
var keyVaultSecretsUser = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '4633458b-17de-408a-b874-0445c86b69e6')

// cloud-init.yaml as the system test boots it: the same placeholders replaced
// (its vault too, here). loadTextContent, not loadFileAsBase64: the text is
// filled in before base64() encodes it for customData.
var recipe = loadTextContent('cloud-init.yaml')
var withVault = replace(recipe, 'https://contoso-kv.vault.azure.net', 'https://${vaultName}${environment().suffixes.keyvaultDns}')
var withPackage = replace(withVault, 'https://downloads.example.com/kv-agent/kv-agent_0.1.0_all.deb', packageUrl)
var customData = replace(withPackage, '0000000000000000000000000000000000000000000000000000000000000000', packageSha256)

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: vaultName
}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: '${scaleSetName}-kv-agent'
  location: location
}

resource secretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, identity.id, keyVaultSecretsUser)
  scope: vault
  properties: {
    roleDefinitionId: keyVaultSecretsUser
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource scaleSet 'Microsoft.Compute/virtualMachineScaleSets@2023-09-01' = {
  name: scaleSetName
  location: location
  sku: {
    name: vmSize
    capacity: instanceCount
  }
  identity: {
    // The only identity of each instance: IMDS answers for it without a
    // client_id, so the manifest needs no identity: block.
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  dependsOn: [
    secretsUser
  ]
  properties: {
    orchestrationMode: 'Uniform'
    upgradePolicy: {
      mode: 'Manual'
    }
    virtualMachineProfile: {
      storageProfile: {
        imageReference: {
          publisher: 'Debian'
          offer: 'debian-12'
          sku: '12-gen2'
          version: 'latest'
        }
        osDisk: {
          createOption: 'FromImage'
          managedDisk: {
            storageAccountType: 'StandardSSD_LRS'
          }
        }
      }
      osProfile: {
        computerNamePrefix: scaleSetName
        adminUsername: adminUsername
        customData: base64(customData)
        linuxConfiguration: {
          disablePasswordAuthentication: true
          ssh: {
            publicKeys: [
              {
                path: '/home/${adminUsername}/.ssh/authorized_keys'
                keyData: adminSshPublicKey
              }
            ]
          }
        }
      }
      networkProfile: {
        networkInterfaceConfigurations: [
          {
            name: 'nic'
            properties: {
              primary: true
              ipConfigurations: [
                {
                  name: 'ipconfig'
                  properties: {
                    subnet: {
                      id: subnetId
                    }
                  }
                }
              ]
            }
          }
        ]
      }
    }
  }
}

output identityClientId string = identity.properties.clientId
output identityPrincipalId string = identity.properties.principalId
